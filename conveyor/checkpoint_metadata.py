"""Reading DCP's `.metadata` without running code: a pickle reader that builds only the metadata's own classes.

torch.distributed.checkpoint writes `.metadata` with `pickle.dump` and reads it back with `pickle.load`,
which calls whatever the file names. `read_metadata` interprets the pickle itself, opcode by opcode, and
builds only what DCP's metadata is made of:

- DCP's metadata dataclasses (`Metadata`, `TensorStorageMetadata`, `TensorProperties`,
  `ChunkStorageMetadata`, `MetadataIndex`, `StorageMeta`, the file system's `_StorageInfo`), created
  empty and filled with their fields;
- `torch.Size` of integers, torch's dtypes and layouts looked up by name, DCP's memory-format code;
- a pure path (the folder the checkpoint was saved to, which DCP keeps for its logs).

Any other global (a function, any other class, and `BytesStorageMetadata`, whose entries DCP reads back
with `torch.load(weights_only=False)`) is refused before anything is looked up or called, naming the file
and what it asked for. The result is then checked to have the shape of DCP's metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from .checkpoint_errors import DamagedCheckpointError, UnsafeCheckpointError

__all__ = ["METADATA_FILE", "read_metadata"]

METADATA_FILE = ".metadata"

_DCP = "torch.distributed.checkpoint.metadata"
# Made by NEWOBJ (no arguments) and filled by BUILD: the only classes a metadata file may instantiate.
_CLASSES: dict[tuple[str, str], type] = {
    (_DCP, "Metadata"): dcp_metadata.Metadata,
    (_DCP, "TensorStorageMetadata"): dcp_metadata.TensorStorageMetadata,
    (_DCP, "TensorProperties"): dcp_metadata.TensorProperties,
    (_DCP, "ChunkStorageMetadata"): dcp_metadata.ChunkStorageMetadata,
    (_DCP, "MetadataIndex"): dcp_metadata.MetadataIndex,
    (_DCP, "StorageMeta"): dcp_metadata.StorageMeta,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
}
_MEMORY_FORMAT: type[Enum] = dcp_metadata._MEM_FORMAT_ENCODING
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}


class _Malformed(Exception):
    """Bytes that are not a pickle of DCP's metadata (internal: becomes an UnsafeCheckpointError)."""


class _Truncated(Exception):
    """The pickle ends before its STOP (internal: becomes a DamagedCheckpointError)."""


def _size(*args: Any) -> torch.Size:
    if len(args) != 1 or type(args[0]) is not tuple or not all(type(n) is int for n in args[0]):
        raise _Malformed(f"torch.Size takes one tuple of integers; got {args!r:.80}")
    return torch.Size(args[0])


def _layout(*args: Any) -> torch.layout:
    if len(args) != 1 or type(args[0]) is not str or args[0] not in _LAYOUTS:
        raise _Malformed(f"a layout is one of {sorted(_LAYOUTS)}; got {args!r:.80}")
    return _LAYOUTS[args[0]]


def _memory_format(*args: Any) -> Enum:
    if len(args) != 1 or type(args[0]) is not int:
        raise _Malformed(f"a memory-format code is one integer; got {args!r:.80}")
    try:
        return _MEMORY_FORMAT(args[0])
    except ValueError:
        raise _Malformed(f"{args[0]} is not a memory-format code") from None


def _pure(kind: type[PurePosixPath] | type[PureWindowsPath]) -> Callable[..., Any]:
    """A path, as a pure path: it names the folder saved to; nothing touches the file system."""

    def make(*parts: Any) -> Any:
        if not all(type(part) is str for part in parts):
            raise _Malformed(f"a path is made of strings; got {parts!r:.80}")
        return kind(*parts)

    return make


# Called by REDUCE, each checking its arguments: the only functions a metadata file may call.
_CALLS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    (_DCP, "_MEM_FORMAT_ENCODING"): _memory_format,
    **{(module, name): _pure(PurePosixPath) for module in ("pathlib", "pathlib._local") for name in ("PosixPath",)},
    **{(module, name): _pure(PureWindowsPath) for module in ("pathlib", "pathlib._local") for name in ("WindowsPath",)},
}


class _Global:
    """A class or function the pickle named, on the stack: only NEWOBJ or REDUCE can use it."""

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key


def read_metadata(folder: str | Path) -> dcp_metadata.Metadata:
    """The `.metadata` of the DCP checkpoint in `folder`, read without running anything it names.

    Raises UnsafeCheckpointError naming the file and the global it asked for (or what else is not DCP's
    metadata), DamagedCheckpointError when the file is missing or ends early.
    """
    path = Path(folder) / METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpointError(folder, [f"it has no {METADATA_FILE} (DCP's index of its tensors)"]) from None
    try:
        result = _Reader(data, path).load()
    except UnsafeCheckpointError:
        raise
    except _Truncated:
        raise DamagedCheckpointError(folder, [f"{METADATA_FILE} ends early ({len(data)} bytes): truncated"]) from None
    except Exception as error:  # _Malformed, or what a checked call or a stack gone wrong raised
        raise UnsafeCheckpointError(
            f"{path} is not DCP's metadata ({error}); refusing to read it, and nothing in it was run:"
            " the file was altered or written by something else. Delete the checkpoint or restore it from a copy"
        ) from None
    try:
        _check_shape(result)
    except _Malformed as error:
        raise UnsafeCheckpointError(
            f"{path} is not DCP's metadata: {error}; refusing to use it. Delete the checkpoint or restore it"
            " from a copy"
        ) from None
    assert isinstance(result, dcp_metadata.Metadata)
    if result.storage_meta is None:
        result.storage_meta = dcp_metadata.StorageMeta()
    return result


class _Reader:
    """One pickle, interpreted over a closed set of opcodes (protocols 2 to 5, without out-of-band buffers)."""

    def __init__(self, data: bytes, path: Path) -> None:
        self._data, self._path, self._at = data, path, 0
        self._stack: list[Any] = []
        self._marks: list[list[Any]] = []
        self._memo: dict[int, Any] = {}

    def _read(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise _Truncated
        chunk = self._data[self._at : self._at + n]
        self._at += n
        return chunk

    def _skip(self, n: int) -> None:
        self._read(n)

    def _drop(self, value: Any) -> None:
        """POP and POP_MARK: what they take off the stack is not kept."""

    def _unpack(self, form: str) -> Any:
        return struct.unpack(form, self._read(struct.calcsize(form)))[0]

    def _line(self) -> str:
        end = self._data.find(b"\n", self._at)
        if end < 0:
            raise _Truncated
        text = self._data[self._at : end].decode("utf-8")
        self._at = end + 1
        return text

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        self._stack = self._marks.pop()
        return items

    def load(self) -> Any:
        while True:
            code = self._read(1)[0]
            if code == 0x2E:  # STOP
                if len(self._stack) != 1 or self._marks:
                    raise _Malformed("the pickle does not end with one object")
                return self._stack[0]
            handler = _OPCODES.get(code)
            if handler is None:
                raise _Malformed(f"opcode {bytes([code])!r} at byte {self._at - 1}, which DCP's metadata never uses")
            handler(self)

    # The opcodes that name something to build: the only places a pickle can reach code.
    def _global(self, module: str, name: str) -> None:
        if (module, name) == ("torch", name) and name in _DTYPES:
            self._stack.append(_DTYPES[name])
        elif (module, name) in _CLASSES or (module, name) in _CALLS:
            self._stack.append(_Global((module, name)))
        else:
            raise UnsafeCheckpointError(
                f"{self._path} asks to build {module}.{name}, which a checkpoint's metadata never holds: refusing"
                " to read it, and nothing in it was run (it allows only DCP's metadata classes, torch.Size, dtypes"
                " and layouts). The file was altered or is not DCP's: do not load this checkpoint; delete it or"
                " restore it from a copy you trust"
            )

    def _newobj(self) -> None:
        args = self._stack.pop()
        cls = self._stack.pop()
        if not isinstance(cls, _Global) or cls.key not in _CLASSES:
            raise _Malformed(f"NEWOBJ of {_describe(cls)}, not of a metadata class")
        if args != ():
            raise _Malformed(f"{'.'.join(cls.key)} made with arguments {args!r:.80}")
        kind = _CLASSES[cls.key]
        self._stack.append(object.__new__(kind))  # what NEWOBJ does for these plain dataclasses

    def _reduce(self) -> None:
        args = self._stack.pop()
        func = self._stack.pop()
        if not isinstance(func, _Global) or func.key not in _CALLS or type(args) is not tuple:
            raise _Malformed(f"REDUCE of {_describe(func)}, not of torch.Size, a layout, or a path")
        self._stack.append(_CALLS[func.key](*args))

    def _build(self) -> None:
        state = self._stack.pop()
        inst = self._stack[-1]
        kind = type(inst)
        if kind not in _CLASSES.values():
            raise _Malformed(f"BUILD of {_describe(inst)}, not of a metadata object")
        safe_dict = type(state) is dict and all(type(k) is str and not k.startswith("__") for k in state)
        if not safe_dict and type(state) is not tuple:
            raise _Malformed(f"the state of {kind.__name__} is not a dict of its fields")
        if "__setstate__" in vars(kind):  # TensorProperties: a tuple of dtype, layout, flags, format code
            inst.__setstate__(state)
        elif safe_dict:
            inst.__dict__.update(state)
        else:
            raise _Malformed(f"the state of {kind.__name__} is a tuple, not a dict of its fields")

    def _memoize(self, index: int | None = None) -> None:
        self._memo[len(self._memo) if index is None else index] = self._stack[-1]

    def _get(self, index: int) -> None:
        if index not in self._memo:
            raise _Malformed(f"memo entry {index} is read before it is written")
        self._stack.append(self._memo[index])

    def _setitems(self, items: list[Any]) -> None:
        target = self._stack[-1]
        if type(target) is not dict or len(items) % 2:
            raise _Malformed(f"SETITEMS on a {type(target).__name__}")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if isinstance(key, _Global) or isinstance(value, _Global):
                raise _Malformed("a class or function stored as data")
            target[key] = value

    def _append(self, items: list[Any]) -> None:
        target = self._stack[-1]
        if type(target) is not list or any(isinstance(item, _Global) for item in items):
            raise _Malformed(f"APPEND to a {type(target).__name__}")
        target.extend(items)

    def _tuple(self, items: list[Any]) -> None:
        if any(isinstance(item, _Global) for item in items):
            raise _Malformed("a class or function stored as data")
        self._stack.append(tuple(items))

    def _tuple_of_top(self, n: int) -> None:
        items = self._stack[len(self._stack) - n :]
        if len(items) != n:
            raise _Malformed("TUPLE of an empty stack")
        del self._stack[len(self._stack) - n :]
        self._tuple(items)

    def _mark(self) -> None:
        self._marks.append(self._stack)
        self._stack = []

    def _long(self, length_form: str) -> None:
        n = self._unpack(length_form)
        if n > 64:  # a byte offset or a size: far less than 2**512
            raise _Malformed(f"an integer of {n} bytes")
        self._stack.append(int.from_bytes(self._read(n), "little", signed=True))

    def _text(self, length_form: str) -> None:
        self._stack.append(self._read(self._unpack(length_form)).decode("utf-8", "surrogatepass"))


def _describe(value: Any) -> str:
    return ".".join(value.key) if isinstance(value, _Global) else type(value).__name__


_OPCODES: dict[int, Callable[[_Reader], None]] = {
    0x80: lambda r: r._skip(1),  # PROTO
    0x95: lambda r: r._skip(8),  # FRAME: a length hint; the whole file is in memory
    0x28: _Reader._mark,  # MARK
    0x30: lambda r: r._drop(r._stack.pop()),  # POP
    0x31: lambda r: r._drop(r._pop_mark()),  # POP_MARK
    0x4E: lambda r: r._stack.append(None),  # NONE
    0x88: lambda r: r._stack.append(True),  # NEWTRUE
    0x89: lambda r: r._stack.append(False),  # NEWFALSE
    0x4A: lambda r: r._stack.append(r._unpack("<i")),  # BININT
    0x4B: lambda r: r._stack.append(r._read(1)[0]),  # BININT1
    0x4D: lambda r: r._stack.append(r._unpack("<H")),  # BININT2
    0x8A: lambda r: r._long("<B"),  # LONG1
    0x8B: lambda r: r._long("<I"),  # LONG4
    0x47: lambda r: r._stack.append(r._unpack(">d")),  # BINFLOAT
    0x8C: lambda r: r._text("<B"),  # SHORT_BINUNICODE
    0x58: lambda r: r._text("<I"),  # BINUNICODE
    0x8D: lambda r: r._text("<Q"),  # BINUNICODE8
    0x29: lambda r: r._stack.append(()),  # EMPTY_TUPLE
    0x74: lambda r: r._tuple(r._pop_mark()),  # TUPLE
    0x85: lambda r: r._tuple_of_top(1),  # TUPLE1
    0x86: lambda r: r._tuple_of_top(2),  # TUPLE2
    0x87: lambda r: r._tuple_of_top(3),  # TUPLE3
    0x5D: lambda r: r._stack.append([]),  # EMPTY_LIST
    0x61: lambda r: r._append([r._stack.pop()]),  # APPEND
    0x65: lambda r: r._append(r._pop_mark()),  # APPENDS
    0x7D: lambda r: r._stack.append({}),  # EMPTY_DICT
    0x73: lambda r: r._setitems(list(reversed([r._stack.pop(), r._stack.pop()]))),  # SETITEM
    0x75: lambda r: r._setitems(r._pop_mark()),  # SETITEMS
    0x93: lambda r: r._global(*_names(r._stack.pop(), r._stack.pop())),  # STACK_GLOBAL
    0x63: lambda r: r._global(r._line(), r._line()),  # GLOBAL
    0x81: _Reader._newobj,  # NEWOBJ
    0x52: _Reader._reduce,  # REDUCE
    0x62: _Reader._build,  # BUILD
    0x94: lambda r: r._memoize(),  # MEMOIZE
    0x71: lambda r: r._memoize(r._read(1)[0]),  # BINPUT
    0x72: lambda r: r._memoize(r._unpack("<I")),  # LONG_BINPUT
    0x68: lambda r: r._get(r._read(1)[0]),  # BINGET
    0x6A: lambda r: r._get(r._unpack("<I")),  # LONG_BINGET
}


def _names(name: Any, module: Any) -> tuple[str, str]:
    """STACK_GLOBAL's operands (popped name first): two strings."""
    if type(module) is not str or type(name) is not str:
        raise _Malformed("STACK_GLOBAL of something other than two strings")
    return module, name


def _check_shape(metadata: Any) -> None:
    """Raise _Malformed unless `metadata` holds what DCP's readers expect, with the types they expect."""
    if type(metadata) is not dcp_metadata.Metadata:
        raise _Malformed(f"it holds a {_describe(metadata)}, not a Metadata")
    _check_fields(metadata)
    entries = metadata.state_dict_metadata
    if type(entries) is not dict:
        raise _Malformed("its state_dict_metadata is not a dict")
    for key, entry in entries.items():
        if type(key) is not str or type(entry) is not dcp_metadata.TensorStorageMetadata:
            raise _Malformed(f"entry {key!r:.80} is a {_describe(entry)}, not a tensor's")
        _check_fields(entry)
        props = entry.properties
        if type(props) is not dcp_metadata.TensorProperties or type(props.dtype) is not torch.dtype:
            raise _Malformed(f"entry {key} has no dtype")
        if type(entry.size) is not torch.Size or type(entry.chunks) is not list:
            raise _Malformed(f"entry {key} has no size or chunks")
        for chunk in entry.chunks:
            if type(chunk) is not dcp_metadata.ChunkStorageMetadata:
                raise _Malformed(f"a chunk of entry {key} is a {_describe(chunk)}")
            _check_fields(chunk)
            if type(chunk.offsets) is not torch.Size or type(chunk.sizes) is not torch.Size:
                raise _Malformed(f"a chunk of entry {key} has no offsets or sizes")
    storage = metadata.storage_data
    if type(storage) is not dict:
        raise _Malformed("its storage_data is not a dict (not the file system's)")
    for index, info in storage.items():
        if type(index) is not dcp_metadata.MetadataIndex or type(info) is not _StorageInfo:
            raise _Malformed(f"a storage entry is a {_describe(index)} -> {_describe(info)}")
        _check_fields(index)
        _check_fields(info)
        if type(info.relative_path) is not str or type(info.offset) is not int or type(info.length) is not int:
            raise _Malformed(f"the storage of {index.fqn!r:.80} has no file, offset or length")
        if info.offset < 0 or info.length < 0:
            raise _Malformed(f"the storage of {index.fqn} has a negative offset or length")
    if metadata.storage_meta is not None and type(metadata.storage_meta) is not dcp_metadata.StorageMeta:
        raise _Malformed(f"its storage_meta is a {_describe(metadata.storage_meta)}")


def _check_fields(obj: Any) -> None:
    """Every field of a dataclass made from the pickle is set (its own, or the class's default)."""
    assert is_dataclass(obj)
    for field in fields(obj):
        if not hasattr(obj, field.name):
            raise _Malformed(f"a {type(obj).__name__} without its {field.name}")
