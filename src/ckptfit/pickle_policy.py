"""What a pickle may name: the fixed tables behind every decision of the restricted interpreter.

Every global a pickle references is matched exactly as ``(module, name)`` after
:func:`normalise` (only the aliases ``__builtin__``, ``copy_reg``, ``_codecs`` and
``numpy.core``/``numpy._core`` are mapped; a dotted name such as ``('torch',
'ops.load_library')`` matches no table entry, and is checked for danger as the full attribute
path ``torch.ops.load_library`` that pickle would resolve). :func:`is_dangerous` says which
globals would run code; :func:`is_inert` which classes are also inert under real unpickling (the
allowlist behind ``ckptfit scan``'s ``clean``). What ckptfit rebuilds itself is in
:mod:`ckptfit.pickle_rebuild`; :class:`GlobalRef` and :class:`PickleScan` record what one pickle
referenced.
"""
from __future__ import annotations

import _compat_pickle
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Kind", "GlobalRef", "PickleScan", "normalise", "is_dangerous", "is_inert"]

Kind = Literal["tensor", "data", "unknown", "dangerous"]

_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "numpy.core": "numpy._core",
    "_codecs": "codecs",
}

# Modules whose every name is dangerous to call (or even to import).
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "socket", "pty", "importlib",
    "runpy", "pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "ctypes", "_ctypes", "cffi",
    "code", "codeop", "webbrowser", "antigravity", "multiprocessing", "asyncio", "types", "pdb", "bdb", "trace",
    "profile", "cProfile", "timeit", "commands", "platform", "pip", "setuptools", "distutils", "zipimport",
    "pkgutil", "pydoc", "site", "ensurepip", "tempfile", "glob", "io", "_io", "fileinput", "urllib", "http",
    "ftplib", "smtplib", "telnetlib", "xmlrpc", "requests", "httplib", "sqlite3", "signal", "resource",
    "threading", "_thread", "gc", "inspect", "operator", "_operator", "functools", "_functools", "joblib",
    "shelve", "dbm", "tarfile", "zipfile", "venv", "imp", "linecache", "doctest", "unittest", "logging.config",
    "yaml", "pandas.io.pickle", "fcntl", "termios", "builtins.__dict__", "torch.hub", "torch.jit",
    "torch.package", "torch.serialization", "torch.utils.cpp_extension", "torch._C", "torch.ops", "torch._ops",
    "torch._dynamo", "torch._inductor", "torch.fx", "torch.multiprocessing", "torch.distributed.rpc",
    "torch.utils._import_utils", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
    "_posixsubprocess", "_winapi", "msvcrt", "winreg", "mmap", "select", "ssl", "uuid._uuid", "atexit",
    "readline", "rlcompleter", "idlelib", "tkinter", "transformers.dynamic_module_utils", "huggingface_hub",
    # write files, compile or evaluate source, run commands, load shared libraries
    "py_compile", "compileall", "logging.handlers", "torch.utils.collect_env", "torch.utils.data.datapipes",
    "torch.library", "torch.utils.benchmark", "numpy.lib._npyio_impl", "numpy.lib.npyio", "numpy.lib.format",
    "numpy._core.records", "numpy.core.records", "numpy.rec", "numpy.ma.mrecords", "numpy.lib._datasource",
    "numpy.lib._utils_impl", "builtins.__import__", "_bootlocale", "tokenize", "ast", "symtable", "dis",
}
# Harmless names inside otherwise dangerous modules: building them runs nothing by itself
# (``functools.partial(f, ...)`` only calls ``f``, itself a global that is classified on its own).
_SAFE_IN_DANGEROUS = {("functools", "partial")}
# Single dangerous names inside otherwise harmless modules.
_DANGEROUS_NAMES = {
    ("builtins", n) for n in (
        "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__", "globals", "locals",
        "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview", "type", "super", "classmethod",
        "staticmethod", "property", "print", "dir", "hasattr", "execfile", "file", "reload", "apply",
    )
} | {
    ("torch", "load"), ("torch", "save"), ("torch", "compile"), ("torch", "from_file"), ("numpy", "load"),
    ("numpy", "save"), ("numpy", "fromfile"), ("numpy", "memmap"), ("numpy", "loadtxt"), ("numpy", "genfromtxt"),
    ("numpy.lib.npyio", "load"), ("torch.storage", "_load_from_bytes"), ("torch", "_load_from_bytes"),
    ("copyreg", "add_extension"), ("torch._utils", "_import_dotted_name"), ("pandas", "read_pickle"),
    ("numpy", "frompyfunc"), ("numpy", "vectorize"),
    # evaluate or compile a string, open or write a file, load a library
    ("typing", "get_type_hints"), ("typing", "_eval_type"), ("typing", "ForwardRef"), ("typing", "evaluate_forward_ref"),
    ("codecs", "open"), ("codecs", "EncodedFile"), ("codecs", "StreamReaderWriter"), ("codecs", "StreamRecoder"),
    ("logging", "FileHandler"), ("logging", "basicConfig"), ("logging", "config"), ("numpy", "savetxt"),
    ("numpy", "savez"), ("numpy", "savez_compressed"), ("numpy", "save"), ("numpy", "tofile"), ("numpy", "fromregex"),
    ("numpy", "DataSource"), ("torch", "load_library"), ("torch.ops", "load_library"),
}
# Names that mean "run code" whatever module they come from (a re-export of os.system is os.system).
_DANGEROUS_BARE = {
    "system", "popen", "popen2", "popen3", "popen4", "execv", "execve", "execl", "execle", "execlp", "execvp",
    "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp", "posix_spawn", "posix_spawnp",
    "startfile", "getoutput", "getstatusoutput", "check_output", "check_call", "Popen", "run_path",
    "run_module", "import_module", "__import__", "eval", "exec", "execfile", "unsafe_load", "full_load",
    "get_class_from_dynamic_module", "_import_dotted_name", "locate", "resolve_name",
}
_DANGEROUS_WORDS = _DANGEROUS_BARE | {
    "loads", "load", "getattr", "call", "run", "compile", "__builtins__", "__globals__", "__getattribute__",
    "__reduce__", "__reduce_ex__", "__subclasses__", "__class__", "__bases__", "__mro__", "__code__",
    "__dict__", "__init__", "__new__", "__call__", "__setstate__", "__getattr__", "open", "remove", "rmtree",
    "unlink", "fork", "kill", "write", "write_text", "write_bytes", "attrgetter", "methodcaller", "setattr",
    "delattr", "exit", "touch", "mkdir", "rmdir", "rename", "replace", "chmod", "lchmod", "symlink_to",
    "hardlink_to", "link_to", "read_text", "read_bytes", "load_library", "savetxt", "save", "dump", "dumps",
    "tofile", "system", "get_type_hints", "_eval_type", "_evaluate", "evaluate", "spawn", "start", "exec_module",
}

_DUNDER_MODULES = {"__main__", "__mp_main__", "__torch__"}


def normalise(module: str, name: str) -> tuple[str, str]:
    """Known aliases only: Python 2 names (as ``pickle`` maps them) and ``numpy.core`` -> ``numpy._core``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    module = _ALIASES.get(module, module)
    if module.startswith("numpy.core."):
        module = "numpy._core." + module[len("numpy.core."):]
    return module, name


def is_dangerous(module: str, name: str) -> bool:
    if (module, name) in _DANGEROUS_NAMES or name in _DANGEROUS_BARE:
        return True
    if (module, name) not in _SAFE_IN_DANGEROUS:
        top = module.split(".")
        for i in range(len(top), 0, -1):
            if ".".join(top[:i]) in _DANGEROUS_MODULES:
                return True
    if f"{module}.{name}" in _DANGEROUS_MODULES:  # ('torch', 'ops'), ('torch', 'hub'): the module itself
        return True
    if "." in name:
        # a dotted name is an attribute path that pickle (protocol 4+) resolves from the module:
        # ('torch', 'ops.load_library') is torch.ops.load_library, ('numpy', 'lib._npyio_impl.load')
        # is numpy.lib._npyio_impl.load. Every split of the full path is checked like a plain global.
        parts = f"{module}.{name}".split(".")
        for i in range(1, len(parts)):
            mod, attr = ".".join(parts[:i]), parts[i]
            if mod in _DANGEROUS_MODULES or (mod, attr) in _DANGEROUS_NAMES or attr in _DANGEROUS_BARE:
                if (mod, attr) not in _SAFE_IN_DANGEROUS:
                    return True
    if any(p.startswith("__") and p.endswith("__") and p not in _DUNDER_MODULES for p in module.split(".")):
        return True  # ``__builtins__``, ``x.__dict__`` ...
    if "." in name:  # dotted names are never resolved; one that spells an attack is dangerous
        parts = name.split(".")
        if any(p in _DANGEROUS_WORDS or p in _DANGEROUS_MODULES or (p.startswith("__") and p.endswith("__"))
               for p in parts):
            return True
    if name.startswith("__") and name.endswith("__") and name not in ("__newobj__", "__newobj_ex__"):
        return True
    return False


@dataclass(frozen=True)
class GlobalRef:
    """One global a pickle references, and what the pickle did with it.

    Attributes:
        module, name: exactly as in the pickle (after alias normalisation).
        kind: ``tensor`` (torch's own rebuild machinery), ``data`` (rebuilt as plain data),
            ``unknown`` (kept as an inert placeholder) or ``dangerous`` (would run code).
        opcode: the opcode that named it (``GLOBAL``, ``STACK_GLOBAL``, ``INST``).
        position: byte offset of that opcode in the pickle.
        called: whether the pickle went on to call or instantiate it (REDUCE, NEWOBJ, OBJ, INST).
        member: which pickle of the file (zip member name, or ``pickle #2`` of a legacy file).
    """

    module: str
    name: str
    kind: Kind
    opcode: str
    position: int
    called: bool = False
    member: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    """What one pickle references: every global with its use, plus anomalies found on the way."""

    member: str = ""
    globals: list[GlobalRef] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    end: int = 0  # offset just past STOP
    protocol: int = 0
    calls: dict[int, int] = field(default_factory=dict)  # index in globals -> times called
    # uses of known globals that would run code under real unpickling all the same (a class's
    # ``__init__`` called by ``copyreg._reconstructor``): not known to be safe, though ckptfit runs none
    unsafe_uses: list[str] = field(default_factory=list)

    def calls_of(self, index: int) -> int:
        """How many times ``globals[index]`` was called or instantiated (a memoised global can be many)."""
        return self.calls.get(index, 0)

    @property
    def dangerous(self) -> list[GlobalRef]:
        return [g for g in self.globals if g.kind == "dangerous"]

    @property
    def names_numpy(self) -> bool:
        """Whether the pickle named any numpy global. Only numpy's reconstructors rebuild arrays, so a
        reader need not walk a tree whose pickle named none to find them."""
        return any(g.module == "numpy" or g.module.startswith("numpy.") for g in self.globals)


# Classes ckptfit reads as inert placeholders that are also inert under real unpickling
# (``torch.load(weights_only=False)``): importing their module runs only library code, and
# creating them (``cls.__new__``, ``cls(*args)``, ``__setstate__`` / ``__dict__`` update) runs
# nothing the file chose. Matched exactly, like every table here; a dotted name never matches.
_INERT: frozenset[tuple[str, str]] = frozenset({
    ("argparse", "Namespace"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
    *(("pathlib._local", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                      "PureWindowsPath")),
    ("typing", "Any"),
    ("torch.torch_version", "TorchVersion"),
    # OmegaConf configs (Lightning's hyper_parameters): containers, nodes and their metadata
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"),
    *(("omegaconf.nodes", n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                       "BytesNode", "PathNode", "EnumNode")),
    # torch.distributed.checkpoint's .metadata: plain dataclasses and one enum
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})
_TORCH_NN_PREFIX = "torch.nn.modules."


def is_inert(module: str, name: str) -> bool:
    """Whether the class ``module.name`` is known to be inert under real unpickling too.

    True for the exact entries of a fixed table (``argparse.Namespace``, ``pathlib`` paths,
    OmegaConf containers, DCP metadata classes, ``typing.Any``) and for the ``nn.Module``
    classes of ``torch.nn`` itself (``torch.nn.modules.linear.Linear``): torch has already
    imported them, and their ``__new__``/``__setstate__`` only store attributes. A module class
    from anywhere else is not: importing its module runs that module's code.
    """
    module, name = normalise(module, name)
    if (module, name) in _INERT:
        return True
    if module.startswith(_TORCH_NN_PREFIX) and name.isidentifier() and not name.startswith("_"):
        import sys

        import torch  # imported here, for files that name a torch.nn class: it imports all of torch.nn.modules

        mod = sys.modules.get(module)  # never imported here
        cls = vars(mod).get(name) if mod is not None else None
        return (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module
                and cls.__qualname__ == name)
    return False
