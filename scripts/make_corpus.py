"""Regenerate jaxpar/data/stdlib_docstrings.txt: docstrings of the Python standard library.

The text is © Python Software Foundation, under the PSF License (as Python itself). The
committed file is the canonical corpus; this script documents how it was made (CPython
3.11.7 stdlib, modules in sorted order, test packages excluded), so output from another
Python version will differ slightly.

    python scripts/make_corpus.py [--max-bytes 1500000]
"""
import argparse
import ast
import os
import sysconfig

SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}


def docstrings(path):
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                yield doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-bytes", type=int, default=1_500_000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "jaxpar", "data",
                                                  "stdlib_docstrings.txt"))
    args = ap.parse_args()
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP)
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    out, size, seen = [], 0, set()
    for f in sorted(files):
        for doc in docstrings(f):
            text = doc.encode("ascii", "ignore").decode()
            if text in seen:
                continue
            seen.add(text)
            out.append(text + "\n\n")
            size += len(out[-1])
            if size >= args.max_bytes:
                break
        if size >= args.max_bytes:
            break
    with open(args.out, "w") as fh:
        fh.write("".join(out))
    print(f"wrote {size} bytes from {len(files)} files to {args.out}")


if __name__ == "__main__":
    main()
