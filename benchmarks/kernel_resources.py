"""Registers and occupancy of the per-token LoRA kernels, compiled for a GPU on any machine.

    PYTHONPATH=. python benchmarks/kernel_resources.py [--arch 90] [--tokens 256]

No GPU needed: Triton compiles each kernel for ``sm_<arch>`` and its bundled ``ptxas`` /
``cuobjdump`` report the registers, stack (spills) and shared memory of the cubin. From them
(and the SM's 64 warps, 64K registers and 228 KiB of shared memory on Hopper) the programs
an SM holds at once, and at ``--tokens`` the grid of each Llama-3-8B projection group and
the waves it takes over ``--sms`` SMs (an upper bound on residency: beside the GEMMs, the
GEMM's blocks hold part of every SM).

Rows: the per-token expand beside the GEMMs as the decode graphs launch it at each batch
size (``lora_expand._beside_gemm_tiles``: one ``[256, 16]`` B tile per program with 8 warps
below 64 tokens, runs of 2 below 128, runs of 4 with 4 warps from 128), in line (4 warps),
and the other runs of ``sweep_decode_lora.py``'s variants; the per-token shrink beside the GEMMs
(256-wide K steps over 512-wide slices).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

LE = importlib.import_module("loraplex.engine.kernels.lora_expand")
LS = importlib.import_module("loraplex.engine.kernels.lora_shrink")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
# Llama-3-8B's projection groups: (K, each projection's outputs)
GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
          "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}  # fmt: skip
PTRS = {
    "buf_ptr": "*fp32", "b_ptr": "*bf16", "ranks_ptr": "*i32", "pages_ptr": "*i32",
    "y_ptr": "*bf16", "token_slot_ptr": "*i32", "x_ptr": "*bf16", "a_ptr": "*bf16",
}  # fmt: skip


def compile_kernel(fn, consts: dict, warps: int, arch: int):
    sig = {
        n: "constexpr" if n in consts else PTRS.get(n, "i32")  # every other argument an int
        for n in fn.arg_names
    }
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(ASTSource(fn, sig, consts), target=target,
                          options={"num_warps": warps, "num_stages": 3})  # fmt: skip


def resources(kernel) -> tuple[int, int, int]:
    """(registers a thread, stack bytes, shared bytes) of a compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if reg is None or stack is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out!r}")
    return int(reg.group(1)), int(stack.group(1)), kernel.metadata.shared


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Hopper: 64 warps, 65,536 registers (allocated per warp in units of 256), 228 KiB of
    shared memory and 32 blocks per SM."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(64 // warps, 65536 // (per_warp * warps), (228 * 1024) // max(shared, 1), 32)


def expand_consts(n_tiles: int, pdl: bool, accumulate: bool) -> dict:
    return dict(P=4, PR=8, BLOCK_N=256, BLOCK_R=16, BLOCK_KS=16, USE_PDL=pdl,
                ACCUMULATE=accumulate, EARLY=pdl, ONE_TILE=True, N_TILES=n_tiles,
                PRELOAD=pdl, VEC=True)  # fmt: skip


def shrink_consts(pdl: bool, block_k: int = 256, k_per: int = 512) -> dict:
    """A rank-16 pool's shrink (``block_k`` steps), or with ``block_k`` 32 the rank-64 pool's
    (the engine's default): BLOCK_R 64 with rank-bucketed steps over ``k_per`` slices."""
    wide = block_k == 32
    kp2 = 1 << (k_per - 1).bit_length()
    return dict(P=4, PR=8, BLOCK_R=64 if wide else 16, BLOCK_K=block_k, USE_PDL=pdl,
                LINE=64, EARLY=pdl, ONE_TILE=False, PRELOAD=False, RANK_SPLIT=wide,
                RANK16_K=min(256, kp2), RANK32_K=min(128, kp2), ROW_DIV=1)  # fmt: skip


def rows(arch: int, tokens: int, sms: int) -> list[dict]:
    out = []
    cases = [
        ("expand beside, 1 tile (decode graphs < 64 tokens)", "expand", 1, 8, False, False),
        ("expand in line, 1 tile", "expand", 1, 4, True, True),
        ("expand beside, 2 tiles (64-127 tokens)", "expand", 2, 8, False, False),
        ("expand beside, 4 tiles", "expand", 4, 8, False, False),
        ("expand beside, 8 tiles", "expand", 8, 8, False, False),
        ("expand beside, 4 tiles, 4 warps (>= 128 tokens)", "expand", 4, 4, False, False),
        ("shrink beside, 512-wide slices", "shrink", 256, 4, False, False),
        ("shrink beside, 8 warps", "shrink", 256, 8, False, False),
        ("shrink beside, 128-wide K steps", "shrink", 128, 4, False, False),
        # the rank-64 pool (the engine's default): 32-wide K steps, rank-bucketed, over
        # K slices of 256 (below 64 tokens) or 2,048 (from 128: lora_shrink._shrink_config)
        ("shrink beside, rank-64 pool, 256-wide slices", "shrink", 32, 4, False, 256),
        ("shrink beside, rank-64 pool, 2,048-wide slices", "shrink", 32, 4, False, 2048),
    ]
    for label, kind, tiles, warps, pdl, acc in cases:  # shrink: tiles = BLOCK_K, acc = k_per
        if kind == "expand":
            k = compile_kernel(LE._bgmv_expand_kernel, expand_consts(tiles, pdl, acc), warps, arch)
            # (T, N ranges of the widest projection, P); past a projection's end, exits
            n_per = 256 * tiles
            grid = {g: tokens * len(o) * -(-max(o) // n_per) for g, (_, o) in GROUPS.items()}
        else:
            k_per = acc if acc > 1 else 512
            consts = shrink_consts(pdl, tiles, k_per)
            k = compile_kernel(LS._bgmv_shrink_kernel, consts, warps, arch)
            # (T, P, K slices)
            grid = {g: tokens * len(o) * -(-K // k_per) for g, (K, o) in GROUPS.items()}
        regs, stack, shared = resources(k)
        per_sm = programs_per_sm(regs, warps, shared)
        layer = sum(grid.values())
        out.append({"kernel": label, "warps": warps, "regs": regs, "stack": stack,
                    "shared": shared, "programs_per_sm": per_sm, "programs_a_layer": layer,
                    "waves_a_layer": layer / (per_sm * sms)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    p.add_argument("--tokens", type=int, default=256, help="the decode batch")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources.py compiles the kernels: unset TRITON_INTERPRET")
    out = rows(args.arch, args.tokens, args.sms)
    cols = list(out[0])
    print(f"sm_{args.arch}, {args.tokens} tokens, {args.sms} SMs, Llama-3-8B's four groups")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
