"""The extension uses the process's C++ runtime, and its error messages format numbers.

A ``contrastive_ops._C`` linked with its own copy of libstdc++ (``-static-libstdc++``,
only ``libstdc++.a`` on the library path, or a compiler that links it so by
default) shares the process with the ``libstdc++.so.6`` that torch loads; the
two copies' locale data get mixed and
every ``TORCH_CHECK`` message that prints a number is cut short or crashes the
process.  ``setup.py`` links the shared libstdc++ (``_linkcheck.link_args()``) and
checks the result; these tests check the library the tests load, the checker
itself (on small libraries built here with and without a static libstdc++), and
the messages.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from contrastive_ops import _ext
from contrastive_ops import _linkcheck
from contrastive_ops.backends import _cext

_OK, _WHY = _cext.availability("cpu")
needs_ext = pytest.mark.skipif(not _OK and os.environ.get("CI") != "true",  # CI must have the extension
                               reason=f"contrastive_ops._C not usable here: {_WHY}")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries only")


def _extension_path() -> str:
    _cext.ensure_loaded()
    return _ext.load().__file__


def _torch_needs_libstdcxx() -> bool:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.exists(lib):
        pytest.skip(f"no {lib} to read torch's own linkage from")
    return any(n.startswith("libstdc++.so") for n in _linkcheck.elf_symbols(lib)[1])


# ---------------------------------------------------------------- the built extension


@linux_only
@needs_ext
def test_extension_has_no_private_libstdcxx():
    path = _extension_path()
    assert _linkcheck.private_libstdcxx_symbols(path) == [], (
        f"{path} carries its own libstdc++ (linked statically): rebuild it against the shared one")
    _linkcheck.check_extension(path)  # the same verdict through setup.py's entry point


@linux_only
@needs_ext
def test_extension_needs_the_shared_libstdcxx():
    """Where torch runs on libstdc++.so, the extension binds to that one (DT_NEEDED), not to a copy of its own."""
    if not _torch_needs_libstdcxx():
        pytest.skip("this torch does not link libstdc++.so")
    needed = _linkcheck.elf_symbols(_extension_path())[1]
    assert any(n.startswith("libstdc++.so") for n in needed), needed


@needs_ext
def test_torch_check_messages_format_integers():
    """Checks whose messages print integers raise RuntimeError with the whole message, numbers included."""
    _cext.ensure_loaded()
    q = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"(?m)tile_rows and tile_cols must be positive, got 0, 5$"):
        torch.ops.contrastive_ops._sim_lse_tiled_fwd(q, q, torch.tensor(1.0), None, None, None, None, None,
                                                     False, 0, 5)
    with pytest.raises(RuntimeError, match=r"q \[4, 3\] and k \[5, 2\] have different feature sizes"):
        torch.ops.contrastive_ops.sim_lse_fwd(q, torch.randn(5, 2), torch.tensor(1.0), None, None, None, None, None,
                                              False)


# ---------------------------------------------------------------- the checker, on libraries built here

_SOURCE = textwrap.dedent("""\
    #include <cstring>
    #include <sstream>
    #include <string>
    extern "C" int format_long(long v, char* buf, int n) {
      std::ostringstream s;
      s << "v=" << v << ";";
      std::strncpy(buf, s.str().c_str(), n);
      return s.good();
    }
    """)


@pytest.fixture(scope="module")
def small_libraries(tmp_path_factory):
    """A small C++ library that formats an integer, linked in the ways that put libstdc++ inside, and fixed.

    ``static``: ``-Wl,-Bsymbolic-functions -static-libstdc++``, as with a compiler that links
    libstdc++ statically by default; ``archive_only``: a library directory holding only
    ``libstdc++.a`` ahead of the system's.  The ``+link_args`` variants add
    ``_linkcheck.link_args()`` after the object, as ``setup.py`` does.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("ELF shared libraries only")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    archive = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("this compiler has no libstdc++.a")
    d = tmp_path_factory.mktemp("linkage")
    src, obj, only_a = d / "fmt.cpp", d / "fmt.o", d / "archive_only"
    src.write_text(_SOURCE)
    only_a.mkdir()
    os.symlink(archive, only_a / "libstdc++.a")
    subprocess.run([cxx, "-O2", "-fPIC", "-c", str(src), "-o", str(obj)], check=True)
    heads = {
        "static": [cxx, "-shared", "-Wl,-Bsymbolic-functions", "-static-libstdc++", str(obj)],
        "archive_only": [cxx, "-shared", "-Wl,-Bsymbolic-functions", f"-L{only_a}", str(obj)],
    }
    libs = {}
    for name, head in heads.items():
        for suffix, tail in (("", []), ("+link_args", _linkcheck.link_args())):
            out = d / f"{name}{suffix}.so"
            subprocess.run(head + ["-o", str(out)] + tail, check=True)
            libs[name + suffix] = str(out)
    return libs


@pytest.mark.parametrize("name", ["static", "archive_only"])
def test_checker_flags_a_private_libstdcxx(small_libraries, name):
    path = small_libraries[name]
    found = _linkcheck.private_libstdcxx_symbols(path)
    assert "std::ostream::_M_insert<long>(long)" in found and "std::locale::classic()" in found, found
    with pytest.raises(_linkcheck.LinkageError, match="linked into it statically"):
        _linkcheck.check_extension(path)


@pytest.mark.parametrize("name", ["static", "archive_only"])
def test_link_args_keep_the_shared_libstdcxx(small_libraries, name):
    """setup.py's link arguments win: no copy inside, libstdc++.so needed, integers format next to torch."""
    path = small_libraries[name + "+link_args"]
    assert _linkcheck.private_libstdcxx_symbols(path) == []
    _linkcheck.check_extension(path)
    assert any(n.startswith("libstdc++.so") for n in _linkcheck.elf_symbols(path)[1])
    # In a process where torch has loaded libstdc++.so.6 (a subprocess: a broken library may crash).
    code = textwrap.dedent(f"""\
        import ctypes, torch
        lib = ctypes.CDLL({path!r})
        buf = ctypes.create_string_buffer(64)
        ok = lib.format_long(42, buf, 64)
        print(ok, buf.value.decode())
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "v=42;"]


def test_checker_agrees_with_nm(small_libraries):
    """The ELF reader finds the same runtime symbols as binutils' nm (static and dynamic tables)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    paths = list(small_libraries.values())
    if _OK and sys.platform.startswith("linux"):
        paths.append(_extension_path())
    for path in paths:
        names = set()
        for flag in ([], ["-D"]):
            out = subprocess.run([nm, "--defined-only", *flag, path], capture_output=True, text=True, check=True)
            names |= {line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip()}
        expect = sorted(r for m, r in _linkcheck.LIBSTDCXX_MARKERS.items() if m in names)
        assert _linkcheck.private_libstdcxx_symbols(path) == expect, path


def test_elf_reader_rejects_other_files(tmp_path):
    p = tmp_path / "not_elf.so"
    p.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(ValueError, match="not an ELF file"):
        _linkcheck.elf_symbols(str(p))
