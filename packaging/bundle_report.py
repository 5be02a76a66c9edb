#!/usr/bin/env python
"""Print what a built bundle weighs: its total size, its biggest parts, and what the spec left out
with what each would have weighed (measured in the build venv this runs in: build.sh runs it there).

    build/packaging-venv/bin/python packaging/bundle_report.py dist/equideq [--top 15] [--json]

Parts are folders two levels below _internal (``torch/lib``, ``PySide6/Qt``), and single files above that.
A left-out module weighs its installed files; a left-out file pattern the installed files it matches
(bundle paths below _internal mirror site-packages).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import sysconfig
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_contents import EXCLUDED_FILES, EXCLUDED_MODULES  # noqa: E402

MB = 1024 * 1024


def file_sizes(bundle: Path) -> dict[str, int]:
    """Path inside the bundle -> bytes, for every regular file (links are not counted twice)."""
    return {str(p.relative_to(bundle)): p.stat().st_size for p in bundle.rglob("*") if p.is_file() and not p.is_symlink()}


def part_of(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "_internal":
        parts = parts[1:]
    return "/".join(parts[:2]) if len(parts) > 2 else "/".join(parts)


def installed_weight(name: str, site: Path) -> int:
    """Bytes of an installed module or package, in site-packages or the standard library (0: not installed)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return max(module_weight(name, folder) for folder in (site, stdlib, stdlib / "lib-dynload"))


def module_weight(name: str, site: Path) -> int:
    base = site.joinpath(*name.split("."))
    if base.is_dir():
        return sum(p.stat().st_size for p in base.rglob("*") if p.is_file() and not p.is_symlink())
    return sum(p.stat().st_size for p in base.parent.glob(base.name + ".*") if p.is_file()) if base.parent.is_dir() else 0


def pattern_weight(pattern: str, site: Path) -> int:
    """Bytes of the installed files that a bundle path pattern matches."""
    top = site / pattern.split("/")[0]
    if not top.is_dir():
        return 0
    return sum(p.stat().st_size for p in top.rglob("*")
               if p.is_file() and fnmatch.fnmatch(str(p.relative_to(site)).replace("\\", "/"), pattern))


def summary(bundle: Path, top: int = 15) -> dict:
    sizes = file_sizes(bundle)
    parts = Counter()
    for path, size in sizes.items():
        parts[part_of(path)] += size
    site = Path(sysconfig.get_paths()["purelib"])
    left_out = [(name, installed_weight(name, site), why) for name, why in EXCLUDED_MODULES.items()]
    left_out += [(pattern, pattern_weight(pattern, site), why) for pattern, why in EXCLUDED_FILES.items()]
    return {"bundle": str(bundle), "files": len(sizes), "bytes": sum(sizes.values()),
            "biggest": parts.most_common(top), "left_out": left_out,
            "left_out_bytes": sum(size for _name, size, _why in left_out), "measured_in": str(site)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.bundle.is_dir():
        p.error(f"{args.bundle}: no such folder (build it with packaging/build.sh)")
    report = summary(args.bundle, args.top)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"== bundle {report['bundle']}: {report['bytes'] / MB:.0f} MiB in {report['files']} files")
    print("   biggest parts:")
    for part, size in report["biggest"]:
        print(f"   {size / MB:8.1f} MiB  {part}")
    print(f"   left out (packaging/bundle_contents.py; installed sizes in {report['measured_in']}): "
          f"{report['left_out_bytes'] / MB:.0f} MiB")
    for name, size, why in report["left_out"]:
        print(f"   {size / MB:8.1f} MiB  {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
