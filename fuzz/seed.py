#!/usr/bin/env python3
"""Seed inputs for the fuzz targets from the repository's own inputs.

    python3 fuzz/seed.py FWMARK_BIN OUT_DIR

writes OUT_DIR/config/* and OUT_DIR/import/*:
- config: fwmark.example.toml; every config written in the Rust sources
  (string literals with a [[service]]); the configs `fwmark import` makes of
  tests/corpus/*.rules;
- import: tests/corpus/*.rules; every rule set written in the Rust sources
  (string literals with `-A `); `fwmark export --format iptables|ip6tables`
  of every valid config seed.
Each file is named by the SHA-1 of its content, as libFuzzer names units.
The seeds are then merged into fuzz/corpus/<target> with `cargo fuzz cmin`
(see fuzz/README.md); only the minimised corpus is committed.
"""

import hashlib
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rust_literals(text):
    """Raw strings r#"..."# and plain "..." literals, unescaped."""
    for m in re.finditer(r'r#"(.*?)"#', text, re.S):
        yield m.group(1)
    for m in re.finditer(r'(?<![r#\w])"((?:[^"\\]|\\.)*)"', text, re.S):
        yield unescape(m.group(1))


def unescape(s):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != "\\" or i + 1 == len(s):
            out.append(c)
            i += 1
            continue
        n = s[i + 1]
        if n == "\n":  # line continuation: skip the newline and leading blanks
            i += 2
            while i < len(s) and s[i] in " \t":
                i += 1
            continue
        out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}.get(n, n))
        i += 2
    return "".join(out)


def write(directory, text):
    data = text.encode()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main():
    fwmark, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    sources = sorted(ROOT.glob("fwmark-user/src/**/*.rs")) + sorted(ROOT.glob("tests/**/*.rs"))
    configs = [(ROOT / "fwmark.example.toml").read_text()]
    rulesets = [p.read_text() for p in sorted((ROOT / "tests/corpus").glob("*.rules"))]
    for src in sources:
        for lit in rust_literals(src.read_text()):
            if "[[service]]" in lit:
                configs.append(lit)
            elif "-A " in lit and ("mangle" in lit or "PREROUTING" in lit):
                rulesets.append(lit)
    for rules in list(rulesets):
        r = subprocess.run([fwmark, "import", "--iface", "eth0", "--skip-unsupported", "-"],
                           input=rules.encode(), capture_output=True)
        if r.returncode == 0:
            configs.append(r.stdout.decode())
    for config in configs:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(config)
            f.flush()
            for fmt in ("iptables", "ip6tables"):
                r = subprocess.run([fwmark, "export", "--config", f.name, "--format", fmt],
                                   capture_output=True)
                if r.returncode == 0:
                    rulesets.append(r.stdout.decode())
    for c in configs:
        write(out / "config", c)
    for r in rulesets:
        write(out / "import", r)
    print(f"{len(configs)} config seeds, {len(rulesets)} import seeds in {out}")


if __name__ == "__main__":
    main()
