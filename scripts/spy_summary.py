"""Summarises a `py-spy record -f raw --threads --idle` profile: per thread, its share of the samples and the
functions it spent them in (inclusive), so the host's bottleneck in `uhap bench train --real-data` is named."""

import collections
import sys


def _short(frame: str) -> str:
    """`name (path/to/file.py:12)` -> `name file.py:12`."""
    name, _, where = frame.partition(" (")
    return f"{name} {where.rstrip(')').rsplit('/', 1)[-1]}"


def main(path: str, top: int = 12) -> None:
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        thread, n = frames[0], int(count)
        totals[thread] += n
        for frame in dict.fromkeys(_short(f) for f in frames[1:]):
            threads[thread][frame] += n
    everything = sum(totals.values())
    for thread, n in totals.most_common(8):
        print(f"== {thread[:90]}: {n} samples ({n / everything:.0%})")
        shared = [(frame, k) for frame, k in threads[thread].most_common() if k < n]  # below the common stem
        for frame, k in shared[:top]:
            print(f"   {k / n:5.1%} {frame[:130]}")


if __name__ == "__main__":
    main(sys.argv[1])
