"""Where each thread of one process spends its time, from a ``py-spy record -f raw`` file
(collapsed stacks; with ``--subprocesses`` each stack starts with its process).

    py-spy record --subprocesses --threads --idle --nonblocking -r 50 -f raw -o prof.txt -- CMD
    python3 benchmarks/pyspy_summary.py prof.txt --process "loraplex.main engine"

Prints the processes by samples, then for each matching process its busiest threads: the
frames with the most samples of their own (where the thread is: a native call, e.g. a CUDA
synchronize, counts for the Python line that made it) and the frames with the most samples
below them (what the time is spent under). ``benchmarks/gpu_serving.sh``'s ``profile``
section runs it on the engine process of a serving run.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict


def read(path: str) -> list[tuple[list[str], int]]:
    rows = []
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if count.isdigit():
                rows.append((stack.split(";"), int(count)))
    return rows


def process_of(frames: list[str]) -> tuple[int, str]:
    """-> (index, frame) of the innermost ``process ...`` frame (a child's, under
    ``--subprocesses``), or (-1, "")."""
    found = (-1, "")
    for i, f in enumerate(frames[:4]):
        if f.startswith("process "):
            found = (i, f)
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("raw", help="py-spy record -f raw output")
    p.add_argument("--process", default="", help="summarize processes whose frame has this")
    p.add_argument("--threads", type=int, default=4, help="busiest threads per process")
    p.add_argument("--top", type=int, default=40, help="frames listed per thread and kind")
    a = p.parse_args(argv)
    rows = read(a.raw)
    procs: Counter[str] = Counter()
    for frames, n in rows:
        procs[process_of(frames)[1]] += n
    print("samples by process:")
    for proc, n in procs.most_common(20):
        print(f"{n:9d}  {proc[:160]}")
    for proc in [q for q in procs if a.process and a.process in q]:
        threads: Counter[str] = Counter()
        own: defaultdict[str, Counter[str]] = defaultdict(Counter)
        under: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for frames, n in rows:
            i, found = process_of(frames)
            if found != proc or i + 1 >= len(frames):
                continue
            thread, body = frames[i + 1], frames[i + 2 :]
            threads[thread] += n
            if body:
                own[thread][body[-1]] += n
            for f in set(body):
                under[thread][f] += n
        print(f"\n{proc[:160]}")
        for thread, n in threads.most_common(a.threads):
            print(f"\n== {thread}: {n} samples\n-- own samples:")
            for f, c in own[thread].most_common(a.top):
                print(f"{c:8d} {100 * c / n:5.1f}%  {f[:150]}")
            print("-- samples under:")
            for f, c in under[thread].most_common(a.top):
                print(f"{c:8d} {100 * c / n:5.1f}%  {f[:150]}")


if __name__ == "__main__":
    main()
