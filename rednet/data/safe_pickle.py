"""Unpickling data files that someone else made, without running their code or filling memory.

A pickle is a program: it names globals (``os.system``, say) and calls them. ``load(path)``
runs only what a data pickle such as CIFAR's needs, i.e. dicts, lists, tuples, strings, bytes,
numbers and numpy arrays of numbers or strings; any other global is refused before anything
is called. Numpy's reconstructors are never called on the file's arguments either: they are
replaced by stand-ins that only record what the file asks for, and the arrays are built at
the end from checked shapes, dtypes and byte counts.

Memory is bounded too. The file is read whole (up to ``max_bytes``) and parsed from memory, so
no length in the file can make the parser allocate more than the file holds; Python's own
unpickler (memo in a dict) is used rather than the C one, whose memo is an array that a single
opcode can make gigabytes long; and the arrays together may not hold more bytes than twice the
file (an honest file holds each array's bytes once; protocol 2 copies them once more).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from typing import Any

import numpy as np


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something a data pickle never contains, or for more memory than it holds."""


class _Array:
    """What the file asked numpy to build: filled by the BUILD opcode, made an array at the end."""

    __hash__ = None  # never a dict key or set member: it is replaced after loading

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise RefusedPickle("it sets an array's state twice")
        self.state = state


class _Dtype:
    __hash__ = None

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise RefusedPickle("it holds a dtype with fields or sub-arrays")
        self.byteorder = state[1]


class _Scalar:
    __hash__ = None

    def __init__(self, dtype: Any, data: Any = None) -> None:
        self.dtype, self.data = dtype, data


# Plain numbers, booleans and fixed-width strings: never objects ('O') or records ('V').
_DTYPE_NAME = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[SU][0-9]{1,9})")
_NDARRAY = object()  # what the file gets for numpy.ndarray: only _reconstruct accepts it

# Every global a CIFAR-format file names (Python 2's official files; re-pickled by Python 3 with
# numpy 1 or 2, protocols 2 to 5), and the stand-in it gets.
ALLOWED = {
    **{(module, "_reconstruct"): "reconstruct" for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): "scalar" for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): "frombuffer" for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
    **{(module, "bytes"): "empty_bytes" for module in ("__builtin__", "builtins")},
}


class _Unpickler(pickle._Unpickler):  # Python's own: its memo is a dict (see the module docstring)
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.budget = 2 * len(data)
        self.built: dict[int, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        kind = ALLOWED.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
        if kind is None:
            raise RefusedPickle(f"it names the global {module}.{name}, which a data file never holds and which "
                                f"could run code")
        return {"reconstruct": self.reconstruct, "scalar": _Scalar, "frombuffer": self.frombuffer,
                "ndarray": _NDARRAY, "dtype": _Dtype, "encode": self.encode,
                "empty_bytes": self.empty_bytes}[kind]

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("it refers to persistent objects, which a data file never holds")

    def load_build(self) -> None:
        # BUILD sets an object's state; through __dict__ or setattr it could rewrite the stand-ins.
        if not isinstance(self.stack[-2], (_Array, _Dtype)):
            raise RefusedPickle(f"it sets the state of a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    # -- the stand-ins for numpy's and Python's reconstructors --------------------------------------

    @staticmethod
    def reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by its state.
        if subtype is not _NDARRAY:
            raise RefusedPickle("it asks numpy's _reconstruct for something other than numpy.ndarray")
        return _Array()

    @staticmethod
    def frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
        # Protocol 5: numpy's _frombuffer(buffer, dtype, shape, order).
        return _Array((1, shape, dtype, order == "F", buffer))

    def encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        # Protocols 0-2 under Python 3 write bytes as _codecs.encode(text, 'latin1').
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise RefusedPickle("it calls _codecs.encode with anything but a string and 'latin1'")
        self.charge(len(text))
        return text.encode("latin1")

    @staticmethod
    def empty_bytes(*args: Any) -> bytes:
        # ... and b"" as bytes(); bytes(n) would allocate n bytes.
        if args:
            raise RefusedPickle("it calls bytes() with arguments")
        return b""

    # -- from stand-ins to arrays ---------------------------------------------------------------

    def charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise RefusedPickle("its arrays claim more bytes than the file holds")

    def dtype(self, spec: Any) -> np.dtype:
        if not isinstance(spec, _Dtype):
            raise RefusedPickle(f"an array's dtype is a {type(spec).__name__}")
        if not isinstance(spec.name, str) or not _DTYPE_NAME.fullmatch(spec.name):
            raise RefusedPickle(f"it holds an array of dtype {spec.name!r}, not plain numbers or strings")
        if spec.byteorder not in ("<", ">", "=", "|"):
            raise RefusedPickle(f"it holds a dtype of byte order {spec.byteorder!r}")
        dtype = np.dtype(spec.name)
        return dtype.newbyteorder(spec.byteorder) if spec.byteorder in "<>" else dtype

    @staticmethod
    def raw(data: Any) -> bytes:
        if isinstance(data, str):  # a Python 2 str, decoded as latin1 by the unpickler
            return data.encode("latin1")
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        raise RefusedPickle(f"an array's data is a {type(data).__name__}, not bytes")

    def array(self, spec: _Array) -> np.ndarray:
        state = spec.state
        if isinstance(state, tuple) and len(state) == 4:  # numpy's oldest format, without a version
            state = (0, *state)
        if not isinstance(state, tuple) or len(state) != 5:
            raise RefusedPickle("it holds an array without a valid state")
        _, shape, dtype, fortran, data = state
        if not isinstance(shape, tuple) or len(shape) > 32 or \
                not all(type(n) is int and n >= 0 for n in shape):
            raise RefusedPickle(f"it holds an array of shape {shape!r}")
        dtype = self.dtype(dtype)
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > self.budget:
            raise RefusedPickle(f"it holds an array of shape {shape} and dtype {dtype}: {claimed} bytes, more than "
                                f"the file holds")
        raw = self.raw(data)
        if len(raw) != claimed:
            raise RefusedPickle(f"it holds an array of shape {shape} and dtype {dtype} with {len(raw)} bytes of data, "
                                f"not {claimed}")
        self.charge(claimed)
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy(order="K")

    def scalar(self, spec: _Scalar) -> np.generic:
        dtype = self.dtype(spec.dtype)
        raw = self.raw(spec.data)
        if len(raw) != dtype.itemsize:
            raise RefusedPickle(f"it holds a {dtype} scalar of {len(raw)} bytes")
        self.charge(len(raw))
        return np.frombuffer(raw, dtype=dtype)[0]

    def build(self, obj: Any) -> Any:
        """``obj`` with every stand-in replaced by the array or scalar it describes."""
        if isinstance(obj, _Array):
            return self.array(obj)
        if isinstance(obj, _Scalar):
            return self.scalar(obj)
        if obj is _NDARRAY or isinstance(obj, _Dtype) or callable(obj):
            raise RefusedPickle("it holds a bare reconstructor where data belongs")
        if not isinstance(obj, (tuple, list, dict)):
            return obj
        # Each container once, however often it is referenced; lists and dicts in place, since
        # they may contain themselves.
        if id(obj) in self.built:
            return self.built[id(obj)]
        if isinstance(obj, tuple):
            self.built[id(obj)] = result = tuple(self.build(item) for item in obj)
            return result
        self.built[id(obj)] = obj
        if isinstance(obj, list):
            obj[:] = [self.build(item) for item in obj]
        else:
            for key, value in obj.items():
                obj[key] = self.build(value)
        return obj


def load(path: str | os.PathLike, max_bytes: int) -> Any:
    """The object pickled in ``path``, as ``pickle.load(f, encoding="latin1")`` would return it.

    Raises :class:`RefusedPickle` for a file over ``max_bytes`` or one that asks for anything but
    plain data (the message says what; nothing the file names has run), and the parser's own
    errors (``pickle.UnpicklingError``, ``EOFError``, ``KeyError``, ...) for a damaged file.
    """
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RefusedPickle(f"it is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB such a file "
                            f"ever needs")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    unpickler = _Unpickler(data)
    try:
        return unpickler.build(unpickler.load())
    except RecursionError:
        raise RefusedPickle("its containers are nested thousands deep") from None
