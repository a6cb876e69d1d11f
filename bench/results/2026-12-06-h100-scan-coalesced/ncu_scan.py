import sys
import moe_raw
from bench.bench_permute import SHAPES, make_inputs
for name in sys.argv[1:]:
    T, E, H, K = SHAPES[name]
    x, rm, probs = make_inputs(T, E, 8, K)
    for _ in range(2):
        moe_raw.permute(x, rm, probs, num_out_tokens=T * K, fused=True)
