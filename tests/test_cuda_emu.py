"""The CUDA emulator itself (tests/cuda_emu): the semantics the kernels' tests rely on, and the errors it must report.

Small CUDA C kernels, written here, run on the emulator; their results are checked against the PTX ISA's and the
CUDA programming guide's definitions (warp shuffles with a width, votes, __syncthreads with exited threads, the
built-in variables, the parameter buffer's layout) and each misuse the emulator promises to report must raise.
"""

from __future__ import annotations

import ctypes
import struct

import cuda_emu
import pytest

pytestmark = pytest.mark.skipif(cuda_emu.unavailable() is not None, reason=str(cuda_emu.unavailable()))

SOURCE = r"""
__global__ void warp_ops(int* out, int width) {
  const int lane = threadIdx.x & 31, v = 100 * threadIdx.x;
  int* o = out + 6 * threadIdx.x;
  o[0] = __shfl_sync(0xffffffffu, v, 3, width);
  o[1] = __shfl_up_sync(0xffffffffu, v, 2, width);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5, width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 9, width);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 32);
}
__global__ void indices(int* out) {
  const int i = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  out[i] = 1000000 * blockIdx.y + 1000 * blockIdx.x + threadIdx.x;
}
__global__ void params(int64_t* out, int a, int64_t b, int c, float d, double e, const void* p, int f) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    out[0] = a; out[1] = b; out[2] = c; out[3] = static_cast<int64_t>(d * 4); out[4] = static_cast<int64_t>(e * 8);
    out[5] = reinterpret_cast<int64_t>(p); out[6] = f;
  }
}
__global__ void exit_then_barrier(int* out) {
  __shared__ int s[64];
  if (threadIdx.x >= 40) return;  // exited threads do not hold a barrier up (Volta and later)
  s[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[39 - threadIdx.x];
}
__global__ void uninitialized_shared(int* out) {
  extern __shared__ int buf[];
  out[threadIdx.x] = buf[threadIdx.x];
}
__global__ void ballot_after_exit(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
}
__global__ void deadlock(int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
  else __syncthreads();
}
__global__ void shared_overrun(int n) {
  extern __shared__ int buf[];
  if (threadIdx.x == 0) buf[n] = 1;
}
__global__ void shfl_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}
__global__ void wild_write(int* p) { p[threadIdx.x] = 1; }
__global__ void misaligned(const unsigned char* p, unsigned* out) {
  out[threadIdx.x] = reinterpret_cast<const uint4*>(p + 4)[threadIdx.x].x;  // 16-byte loads 4 bytes off
}
__global__ void wide_shift(unsigned* out, int s) { out[threadIdx.x] = 1u << (s + threadIdx.x); }
// Stage `bytes` of src in shared memory, thread 0 bulk-copies the stage to rows 0..3 of dst. mode 0: correct;
// 1: thread 0 issues before the barrier; 2: the stage is overwritten before the wait; 3: no wait; 4: misaligned.
__global__ void bulk_rows(unsigned char* dst, const unsigned char* src, int bytes, int mode) {
  extern __shared__ unsigned char stage[];
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) stage[i] = src[i];
  bulk_fence_shared();
  if (mode != 1) __syncthreads();
  if (threadIdx.x == 0) {
    for (int r = 0; r < 4; ++r) bulk_store(dst + r * bytes + (mode == 4 ? 8 : 0), stage, bytes);
    bulk_commit();
  }
  if (mode == 2) {
    __syncthreads();
    for (int i = threadIdx.x; i < bytes; i += blockDim.x) stage[i] = 0;
  }
  if (threadIdx.x == 0 && mode != 3) bulk_wait_read();
}
// Fill a stage of `bytes` from src with cp.async (stage_fill16), then copy it to dst with plain loads. mode 0:
// correct; 1: dst read before the wait (the wait comes after); 2: no wait; 3: source 8 bytes off.
__global__ void stage_fill_rows(unsigned char* dst, const unsigned char* src, int bytes, int mode) {
  extern __shared__ unsigned char stage[];
  for (int v = threadIdx.x; v < bytes / 16; v += blockDim.x)
    stage_fill16(stage + 16 * v, src + 16 * v + (mode == 3 ? 8 : 0));
  if (mode == 0) stage_fill_wait();
  __syncthreads();
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = stage[i];
  if (mode == 1) stage_fill_wait();
}
__global__ void mixed_collectives(int* out) {
  if (threadIdx.x & 1) out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
  else out[threadIdx.x] = __any_sync(0xffffffffu, 1);
}
"""
NAMES = ("warp_ops", "indices", "params", "exit_then_barrier", "uninitialized_shared", "ballot_after_exit",
         "deadlock", "shared_overrun", "shfl_outside_mask", "mixed_collectives", "wild_write", "misaligned",
         "wide_shift", "bulk_rows", "stage_fill_rows")  # fmt: skip


@pytest.fixture(scope="module")
def lib():
    return cuda_emu.build("emu_selftest", SOURCE, NAMES)


def launch(lib, name, grid, block, signature, *args, shared=0):
    params = ctypes.create_string_buffer(struct.pack("@" + signature, *args))
    cuda_emu.run(lib, NAMES.index(name), grid, block, shared, ctypes.addressof(params), name)


def ints(n):
    buf = (ctypes.c_int * n)()
    return buf, ctypes.addressof(buf)


@pytest.mark.parametrize("width", (32, 16, 8, 4))
def test_warp_collectives(lib, width):
    out, addr = ints(64 * 6)
    launch(lib, "warp_ops", 1, 64, "Pi", addr, width)
    votes = sum(1 << j for j in range(32) if j % 3 == 0)
    for t in range(64):
        j, base = t % 32, t // 32 * 32 + t % 32 // width * width
        idx = base + 3 % width
        up = t - 2 if j % width >= 2 else t
        down = t + 5 if j % width + 5 < width else t
        xor = t ^ 9 if (j ^ 9) // width <= j // width else t  # PTX shfl.bfly: an earlier segment is in reach
        want = [100 * idx, 100 * up, 100 * down, 100 * xor, votes - (1 << 32 if votes >= 1 << 31 else 0), 1 + 2]
        assert list(out[6 * t : 6 * t + 6]) == want, (t, width)


def test_built_in_variables(lib):
    out, addr = ints(3 * 2 * 96)
    launch(lib, "indices", (3, 2), 96, "P", addr)
    assert list(out) == [1000000 * y + 1000 * x + t for y in range(2) for x in range(3) for t in range(96)]


def test_parameter_buffer_layout(lib):
    out = (ctypes.c_int64 * 7)()
    launch(lib, "params", 1, 32, "PiqifdPi", ctypes.addressof(out), -7, 1 << 40, 9, 2.5, 0.375, 0xDEAD0, 11)
    assert list(out) == [-7, 1 << 40, 9, 10, 3, 0xDEAD0, 11]


def test_barrier_ignores_exited_threads(lib):
    out, addr = ints(40)
    launch(lib, "exit_then_barrier", 1, 128, "P", addr)
    assert list(out) == [39 - t for t in range(40)]


def test_dynamic_shared_memory_starts_as_garbage(lib):
    out, addr = ints(64)
    launch(lib, "uninitialized_shared", 1, 64, "P", addr, shared=256)
    assert set(out) == {struct.unpack("i", b"\xa5" * 4)[0]}


@pytest.mark.parametrize(
    "name,signature,args,shared,message",
    [
        ("ballot_after_exit", "P", (0,), 0, "which has exited"),
        ("deadlock", "P", (0,), 0, "deadlock"),
        ("shared_overrun", "i", (16,), 64, "past the 64 bytes of dynamic shared memory"),
        ("shfl_outside_mask", "P", (0,), 0, "outside its mask"),
        ("mixed_collectives", "P", (0,), 0, "different warp collectives"),
        ("indices", "P", (0,), 0, "launch shape refused"),
        ("wild_write", "P", (8,), 0, r"block \(0, 0\) thread 0: invalid memory access \(address 0x8\)"),
        ("misaligned", "PP", (0, 0), 0, r"thread 0: undefined behaviour in misaligned\(.*misaligned vector access"),
        ("wide_shift", "Pi", (0, 30), 0, r"thread 2: undefined behaviour in wide_shift\("),
    ],
)
def test_reported_errors(lib, name, signature, args, shared, message):
    out, addr = ints(64)
    args = tuple(addr if a == 0 and c == "P" else a for a, c in zip(args, signature, strict=True))
    block = 2048 if name == "indices" else 64
    with pytest.raises(cuda_emu.EmulatedKernelError, match=message):
        launch(lib, name, 1, block, signature, *args, shared=shared)
    launch(lib, "exit_then_barrier", 1, 128, "P", addr)  # the next launch runs as usual
    assert list(out[:40]) == [39 - t for t in range(40)]


def _bulk_rows(lib, mode, bytes_=256):
    src = (ctypes.c_ubyte * bytes_)(*[(7 * i + 3) % 251 for i in range(bytes_)])
    dst = (ctypes.c_ubyte * (4 * bytes_ + 16))()
    launch(lib, "bulk_rows", 1, 64, "PPii", ctypes.addressof(dst), ctypes.addressof(src), bytes_, mode, shared=bytes_)
    return bytes(src), bytes(dst)


def test_bulk_copy_lands_at_the_wait(lib):
    src, dst = _bulk_rows(lib, 0)
    assert dst[: 4 * len(src)] == src * 4


@pytest.mark.parametrize(
    "mode,message",
    [
        (1, "changed between its bulk_store and bulk_wait_read"),  # ascending order: thread 0 issues first
        (2, "changed between its bulk_store and bulk_wait_read"),
        (3, "exited with a bulk copy it did not wait for"),
        (4, "multiples of 16"),
    ],
)
def test_bulk_copy_misuse_is_reported(lib, mode, message):
    if cuda_emu.schedule != "ascending":
        pytest.skip("mode 1 is a race that the ascending order shows")
    with pytest.raises(cuda_emu.EmulatedKernelError, match=message):
        _bulk_rows(lib, mode)


def test_threads_launch_concurrently(lib):
    """Each calling thread has its own launch state and fiber stacks (ctypes releases the GIL during a launch)."""
    import threading

    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                out, addr = ints(3 * 2 * 96)
                launch(lib, "indices", (3, 2), 96, "P", addr)
                results[i] = list(out)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    want = [1000000 * y + 1000 * x + t for y in range(2) for x in range(3) for t in range(96)]
    assert all(results[i] == want for i in range(8))


def _stage_fill_rows(lib, mode, bytes_=256):
    src = (ctypes.c_ubyte * (bytes_ + 16))(*[(5 * i + 1) % 251 for i in range(bytes_ + 16)])
    dst = (ctypes.c_ubyte * bytes_)()
    args = ctypes.addressof(dst), ctypes.addressof(src), bytes_, mode
    launch(lib, "stage_fill_rows", 1, 8, "PPii", *args, shared=bytes_)
    return bytes(src)[:bytes_], bytes(dst)


def test_stage_fill_lands_at_the_wait(lib):
    src, dst = _stage_fill_rows(lib, 0)
    assert dst == src
    # Read before the wait: the first reader after the barrier sees other threads' fills still missing (garbage).
    src, dst = _stage_fill_rows(lib, 1)
    assert dst != src and b"\xa5" * 16 in dst


@pytest.mark.parametrize("mode,message", [(2, "exited with a stage fill it did not wait for"), (3, "multiples of 16")])
def test_stage_fill_misuse_is_reported(lib, mode, message):
    with pytest.raises(cuda_emu.EmulatedKernelError, match=message):
        _stage_fill_rows(lib, mode)
