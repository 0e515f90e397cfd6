"""Split GGUF files (llama.cpp's `NAME-00001-of-00003.gguf` parts): find every part from the first one's name and
merge them into one GGUF with the gguf package, since transformers reads only single files.

A part holds the same key-value header (plus split.no, split.count, split.tensors.count) and its own share of the
tensors; the merge keeps the first part's keys without the split.* ones and every part's tensors, bytes unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PART_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class SplitGGUFError(ValueError):
    """A split GGUF that cannot be merged (not its first part, or a part missing), with a message for the user."""


def split_parts(path: Path) -> list[Path] | None:
    """Every part's path, in order, when `path` is named as a part of a split GGUF; None for a single file."""
    m = PART_NAME.match(path.name)
    if m is None or int(m["count"]) < 2:
        return None
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise SplitGGUFError(
            f"{path.name} is part {int(m['no'])} of a split GGUF of {count} parts; give the path of "
            f"its first part, {m['stem']}-00001-of-{m['count']}.gguf"
        )
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise SplitGGUFError(
            f"{path.name} is the first part of a split GGUF of {count} parts, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from {path.parent}"
        )
    return parts


def merge_parts(parts: list[Path], out: Path) -> Path:
    """Write the parts' tensors, with the first part's keys less split.*, into one GGUF at `out`, atomically (a
    temporary file renamed: a half-written merge is never mistaken for a finished one)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    readers = [GGUFReader(p) for p in parts]
    first = readers[0].fields
    arch = first["general.architecture"].contents()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = GGUFWriter(tmp, arch)
    if "general.alignment" in first:  # tensor data offsets must keep the parts' alignment
        writer.data_alignment = int(first["general.alignment"].contents())
    for field in first.values():
        # the writer adds general.architecture itself; GGUF.* are the reader's virtual fields
        if field.name == "general.architecture" or field.name.startswith(("GGUF.", "split.")):
            continue
        vtype = field.types[0]
        writer.add_key_value(
            field.name, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None
        )
    tensors = [(t, r.endianess) for r in readers for t in r.tensors]
    for t, _ in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, endianess in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=endianess)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
