"""The quantizers against compressed-tensors' own fake quantization, side by side in one process.

For a random weight matrix (default 4096 x 4096, fp32) at each bit width: our RTN (`recipes.quantize`)
and compressed-tensors' `calculate_qparams` + `fake_quantize` (the path llm-compressor's RTN takes),
same grid (group 128, asymmetric and symmetric). Printed: the largest absolute difference between the
two outputs and how many elements differ at all (a different rounding of a value within one float
ulp of a tie: ours rounds x/s then adds the zero, theirs adds first), the median wall time of `--repeat` runs each, and the ratio ours / theirs. Then, with no
peer installed here (llm-compressor and GPTQModel pull their own torch), the time our GPTQ, HQQ and
PTQTP take on the same matrix, as a multiple of RTN's, with GPTQ's layer output error against RTN's on
correlated inputs. Needs compressed-tensors (the `quant` extra).

    python bench/quantize_vs_compressed_tensors.py [--size 4096] [--bits 2,4] [--repeat 3]
"""

import argparse
import statistics
import time

import torch

from recipes.quantize import quantizers as Q


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def theirs(w: torch.Tensor, bits: int, sym: bool, group: int) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    groups = Q.groups_of(w, group)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    return fake_quantize(w, scale, torch.round(zero), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--bits", default="2,4")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size)
    group = 128
    print(f"RTN on a {args.size} x {args.size} fp32 matrix, group {group}, median of {args.repeat}, {torch.get_num_threads()} threads")
    print(f"{'bits':>4} {'sym':>5} {'max |ours-theirs|':>18} {'elements differing':>19} {'ours s':>8} {'theirs s':>9} {'ratio':>6}")
    for bits in map(int, args.bits.split(",")):
        for sym in (False, True):
            t_ours, ours = timed(lambda: Q.rtn(w, bits, group, sym=sym), args.repeat)
            t_theirs, ref = timed(lambda: theirs(w, bits, sym, group), args.repeat)
            diff = (ours - ref).abs()
            print(f"{bits:>4} {str(sym):>5} {diff.max().item():>18.2e} {int((diff > 0).sum()):>10} of {w.numel():<8}"
                  f"{t_ours:>8.3f} {t_theirs:>9.3f} {t_ours / t_theirs:>6.2f}")

    bits = 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=gen) @ torch.randn(64, args.size, generator=gen) + 0.1 * torch.randn(4096, args.size, generator=gen)
    h = 2 / len(x) * x.T @ x
    t_rtn, rtn = timed(lambda: Q.rtn(w, bits, group), 1)
    print(f"\n{bits}-bit, group {group}: time as a multiple of RTN's ({t_rtn:.3f} s)")
    for name, fn in [("hqq", lambda: Q.hqq(w, bits, group)), ("gptq", lambda: Q.gptq(w, bits, group, hessian=h)),
                     ("ptqtp", lambda: Q.ptqtp(w, 0, group))]:
        t, out = timed(fn, 1)
        line = f"  {name:6} {t:8.2f} s  x{t / t_rtn:8.1f}"
        if name == "gptq":
            err = lambda wq: ((x[:512] @ (wq - w).T) ** 2).mean().item()  # noqa: E731
            line += f"   layer output error vs RTN: {err(out) / err(rtn):.3f}"
        print(line)


if __name__ == "__main__":
    main()
