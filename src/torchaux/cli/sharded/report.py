"""``torchaux inspect DIR``: the report of a distributed checkpoint directory.

Ranks and their data files (size on disk against the size the metadata
expects), every tensor with its global shape and its shard layout (the box of
each shard in the global tensor, and the file, offset and length of its
bytes), the non-tensor values, whether per-chunk checksums are recorded and
with which algorithm, and the encryption (mode from the metadata, key size and
chunk size from the first chunk's envelope header, read without the key).
Nothing is verified here: ``torchaux verify DIR`` reads every byte.

Small plaintext values (``step``, ``lr``) are shown: each is a
``torch.save`` stream read with ``weights_only=True``, as the loader does.

>>> import torch, torchaux.distributed as td
>>> d = os.path.join(doctest_tmp, "rep")
>>> _ = td.save({"w": torch.zeros(4, 2), "step": 3}, d)
>>> r = inspect_dir(d)
>>> r["ranks"], r["checksum"], r["tensors"][0]["shards"][0]["box"], r["values"][0]["value"]
([0], {'present': True, 'algorithm': 'xxh3-64'}, [[0, 4], [0, 2]], 3)
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

from torchaux.cli.sharded.index import Chunk, Index, dtype_name, read_index, tensor_bytes
from torchaux.errors import CheckpointError

__all__ = ["inspect_dir", "format_dir_report"]

# Values up to this size are read and shown (a step, a learning rate, a small
# dict); bigger ones only by size, so inspect stays a metadata read.
_SHOW_VALUE_BYTES = 64 << 10


def _envelope(ix: Index) -> dict[str, Any] | None:
    """The envelope header of the first encrypted chunk that can be read (no key needed)."""
    from torchaux.checkpoint.crypto.envelope import describe_header

    for f in ix.files.values():
        first = next((c for c in f.chunks if c.encrypted), None)
        if first is None or f.size is None or f.size < first.offset + first.length:
            continue
        with open(os.path.join(ix.path, f.name), "rb") as fh:
            fh.seek(first.offset)
            head = io.BytesIO(fh.read(min(first.length, 4096)))
        try:
            return describe_header(head)
        except CheckpointError as exc:  # shown, not raised: verify is the judge
            return {"error": str(exc)}
    return None


def _value(ix: Index, c: Chunk) -> Any:
    if c.encrypted or c.transforms or c.length > _SHOW_VALUE_BYTES:
        return None
    f = ix.files[c.file]
    if f.size is None or f.size < c.offset + c.length:
        return None
    with open(os.path.join(ix.path, c.file), "rb") as fh:
        fh.seek(c.offset)
        raw = fh.read(c.length)
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return obj if isinstance(obj, (bool, int, float, str)) else {"type": type(obj).__name__}


def _shard(c: Chunk, ix: Index) -> dict[str, Any]:
    box = [[o, o + s] for o, s in zip(c.offsets or [], c.sizes or [])]
    return {"offsets": c.offsets, "sizes": c.sizes, "box": box, "file": c.file,
            "rank": ix.files[c.file].rank, "offset": c.offset, "length": c.length,
            "checksum": c.checksum is not None}


def inspect_dir(path: str) -> dict[str, Any]:
    """Describe the distributed checkpoint at ``path`` as a JSON-ready dict (module docstring)."""
    ix = read_index(path)
    by_fqn: dict[str, list[Chunk]] = {}
    for c in ix.chunks:
        by_fqn.setdefault(c.fqn, []).append(c)
    tensors = []
    for name, md in ix.tensors().items():
        tensors.append({
            "name": name, "dtype": dtype_name(md.properties.dtype), "shape": list(md.size),
            "bytes": tensor_bytes(md), "shards": [_shard(c, ix) for c in by_fqn.get(name, [])],
        })
    values = []
    for name in ix.values():
        stored = by_fqn.get(name, [])
        row: dict[str, Any] = {"name": name, "file": None, "offset": None, "length": None}
        if stored:
            c = stored[0]
            row.update(file=c.file, rank=ix.files[c.file].rank, offset=c.offset, length=c.length)
            shown = _value(ix, c)
            if shown is not None:
                row["value"] = shown
        values.append(row)
    files = [{"name": f.name, "rank": f.rank, "size": f.size, "expected_size": f.expected_size,
              "present": f.size is not None, "chunks": len(f.chunks)} for f in ix.files.values()]
    extras = ix.extras or {}
    md = ix.metadata
    return {
        "directory": ix.path,
        "kind": "distributed",
        "committed": True,  # .metadata is renamed into place last: its presence is the commit
        "writer": ix.writer,
        "dcp_version": getattr(md, "version", None),
        "torchaux_version": extras.get("torchaux_version"),
        "generation": extras.get("generation"),
        "checksum": {"present": ix.checksum is not None, "algorithm": ix.checksum},
        "encryption": None if ix.encryption is None else {"mode": ix.encryption,
                                                           "envelope": _envelope(ix)},
        "ranks": ix.ranks,
        "files": files,
        "tensors": tensors,
        "values": values,
        "unreferenced_files": ix.unreferenced,
        "incomplete_saves": ix.staging,
        "totals": {
            "ranks": len(ix.ranks), "files": len(files), "chunks": len(ix.chunks),
            "tensors": len(tensors), "values": len(values),
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "file_bytes": sum(f["size"] or 0 for f in files),
        },
    }


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def _encryption_line(enc: dict[str, Any] | None) -> str:
    if enc is None:
        return "none"
    env = enc.get("envelope") or {}
    if "key_bits" in env:
        from torchaux.cli.inspect import format_size

        return (f"{enc['mode']} per chunk, {env['key_bits']}-bit key, {env['kdf']}, "
                f"{format_size(env['chunk_size'])} cipher chunks (envelope version {env['version']})")
    return f"{enc['mode']} per chunk" + (f" (envelope unreadable: {env['error']})" if env else "")


def format_dir_report(report: dict[str, Any]) -> str:
    """The plain-text form of :func:`inspect_dir`'s report."""
    from torchaux.cli.inspect import format_counts, format_size, printable

    t = report["totals"]
    writer = (f"torchaux {report['torchaux_version']} (generation {report['generation']})"
              if report["writer"] == "torchaux" else "stock DCP FileSystemWriter")
    ck = report["checksum"]
    lines = [
        f"directory   {printable(report['directory'])}",
        f"format      distributed (DCP metadata {report['dcp_version']}), written by {writer}, committed",
        f"ranks       {t['ranks']} ({', '.join(map(str, report['ranks']))}), {t['files']} data "
        f"file{'' if t['files'] == 1 else 's'} ({format_size(t['file_bytes'])}), {t['chunks']} chunks",
        "checksums   " + (f"{ck['algorithm']} per chunk (torchaux verify checks them)" if ck["present"]
                          else "none (stock DCP; torchaux verify checks each chunk's zip CRCs)"),
        f"encryption  {_encryption_line(report['encryption'])}",
        f"entries     {format_counts(t['tensors'], t['tensor_bytes'], t['values'])}",
    ]
    if report["incomplete_saves"]:
        lines.append(f"leftovers   {len(report['incomplete_saves'])} staging folder(s) of saves that "
                     "never committed (the next save removes them)")
    if report["unreferenced_files"]:
        lines.append(f"unreferenced {len(report['unreferenced_files'])} data file(s) no chunk points at")
    rows = [["rank", "file", "bytes", "expected", "chunks"]]
    for f in report["files"]:
        rows.append(["-" if f["rank"] is None else str(f["rank"]), printable(f["name"]),
                     "missing" if f["size"] is None else str(f["size"]), str(f["expected_size"]),
                     str(f["chunks"])])
    lines += ["", *_columns(rows, {2, 3, 4}), ""]
    rows = [["name", "dtype", "shape", "bytes", "shard (box in the global tensor)", "rank", "file",
             "offset", "length"]]
    for tr in report["tensors"]:
        shape = "[" + ", ".join(map(str, tr["shape"])) + "]"
        head = [printable(tr["name"]), tr["dtype"], shape, str(tr["bytes"])]
        for i, s in enumerate(tr["shards"] or [None]):
            left = head if i == 0 else ["", "", "", ""]
            if s is None:
                rows.append(left + ["(no stored chunk)", "", "", "", ""])
                continue
            box = "[" + ", ".join(f"{a}:{b}" for a, b in s["box"]) + "]"
            rows.append(left + [box, "-" if s["rank"] is None else str(s["rank"]),
                                printable(s["file"]), str(s["offset"]), str(s["length"])])
    lines += _columns(rows, {3, 7, 8})
    if report["values"]:
        rows = [["value", "rank", "file", "offset", "length", "content"]]
        for v in report["values"]:
            content = repr(v["value"]) if "value" in v else ""
            rows.append([printable(v["name"]), str(v.get("rank", "-")), printable(v["file"] or "-"),
                         str(v["offset"]), str(v["length"]), printable(content)])
        lines += ["", *_columns(rows, {3, 4})]
    return "\n".join(lines)
