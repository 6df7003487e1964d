"""Does a built extension carry its own copy of the C++ runtime?  (ELF reader, standard library only.)

``contrastive_ops._C`` must use the libstdc++ of the process (``libstdc++.so.6``,
already loaded by torch) and never a private copy linked in statically
(``-static-libstdc++``, or a toolchain that does so by default).  A private
copy shares the process with the real one and the two get mixed: the facet ids
of ``std::locale`` (``std::num_put<char>::id`` & co.) are ``STB_GNU_UNIQUE``
symbols that the dynamic loader merges process-wide whatever ``-Bsymbolic``
says, so the private copy's locale tables are indexed with ids handed out by
the other copy.  Printing an integer into a stream then fails: the message of
every ``TORCH_CHECK`` that formats a number comes out truncated (the stream
goes bad) or the process crashes inside ``std::ostream::_M_insert<long>``.

``setup.py`` links the shared libstdc++ explicitly (``link_args``) and calls
``check_extension`` on the built library; ``tests/test_linkage.py`` checks the
library the tests load.  Both read the ELF symbol tables here rather than run
``nm``, which a machine that only runs the library may lack.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, List, Optional, Set, Tuple

def loaded_libstdcxx() -> Optional[str]:
    """The file of the libstdc++ shared library mapped into this process (Linux; after ``import torch``), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5]).startswith("libstdc++.so"):
                    return fields[5]
    except OSError:
        pass
    return None


def link_args() -> List[str]:
    """Arguments that link the extension against the shared libstdc++ that torch runs on.

    Appended to the link line (after the objects and torch's libraries; the compiler
    driver adds its own libstdc++ after these).  The runtime is named by the file
    this process has loaded, not by ``-lstdc++``: a toolchain whose library directory
    holds only ``libstdc++.a`` would resolve ``-lstdc++`` to the archive.  With the
    shared library first on the line, every C++ runtime symbol of our objects is
    resolved against it (recorded as DT_NEEDED ``libstdc++.so.6``), and an archive
    that the driver appends afterwards (``-static-libstdc++``, as a flag or as the
    compiler's default) has nothing left to contribute.  ``-Bdynamic`` first, so that
    no ``-Bstatic`` earlier on the line applies.  Without a loaded libstdc++ (not
    Linux, or a torch that does not use it): ``-lstdc++``.
    """
    lib = loaded_libstdcxx()
    return ["-Wl,-Bdynamic", lib if lib else "-lstdc++"]


# Functions and data that only the C++ runtime itself defines: explicit instantiations
# that the headers declare ``extern template`` and non-template runtime entry points.
# A shared object compiled normally refers to them (undefined symbols); one that
# defines any of them has a copy of libstdc++/libsupc++ inside.
LIBSTDCXX_MARKERS: Dict[str, str] = {
    "_ZNSo9_M_insertIlEERSoT_": "std::ostream::_M_insert<long>(long)",
    "_ZNSt7num_putIcSt19ostreambuf_iteratorIcSt11char_traitsIcEEE2idE": "std::num_put<char>::id",
    "_ZNSt6locale7classicEv": "std::locale::classic()",
    "_ZNSt8ios_base4InitC1Ev": "std::ios_base::Init::Init()",
    "_ZSt9terminatev": "std::terminate()",
    "__cxa_throw": "__cxa_throw",
    "__gxx_personality_v0": "__gxx_personality_v0",
}

_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NEEDED = 1
_STT_SECTION, _STT_FILE = 3, 4


class LinkageError(RuntimeError):
    """The extension was linked with its own copy of the C++ runtime."""


def _cstr(blob: bytes, offset: int) -> str:
    end = blob.index(b"\0", offset)
    return blob[offset:end].decode("utf-8", "replace")


def elf_symbols(path: str) -> Tuple[Set[str], List[str]]:
    """(names of the symbols ``path`` defines, in .symtab or .dynsym; its DT_NEEDED libraries).

    Raises ``ValueError`` if ``path`` is not an ELF file.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 64 or f.read(4) != b"\x7fELF":
            raise ValueError(f"{path} is not an ELF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # CUDA libraries can be large
            return _read_symbols(data)


def _read_symbols(data) -> Tuple[Set[str], List[str]]:
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sh_fmt, sym_fmt, dyn_fmt = end + "IIQQQQIIQQ", end + "IBBHQQ", end + "qQ"
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        sh_fmt, sym_fmt, dyn_fmt = end + "IIIIIIIIII", end + "IIIBBH", end + "iI"

    def section(i):
        name, typ, flags, addr, offset, size, link, info, align, entsize = struct.unpack_from(
            sh_fmt, data, shoff + i * shentsize)
        return typ, offset, size, link, entsize

    if shoff == 0:
        return set(), []
    if shnum == 0:  # extended numbering: the count is in section 0's size
        shnum = section(0)[2]
    sections = [section(i) for i in range(shnum)]
    defined: Set[str] = set()
    needed: List[str] = []
    for typ, offset, size, link, entsize in sections:
        if typ in (_SHT_SYMTAB, _SHT_DYNSYM) and entsize:
            str_off, str_size = sections[link][1], sections[link][2]
            strtab = data[str_off:str_off + str_size]
            for pos in range(offset, offset + size, entsize):
                fields = struct.unpack_from(sym_fmt, data, pos)
                name_off = fields[0]
                info, shndx = (fields[1], fields[3]) if is64 else (fields[3], fields[5])
                # SHN_UNDEF: a reference, not a definition; section and file names are no symbols
                if name_off and shndx != 0 and info & 0xF not in (_STT_SECTION, _STT_FILE):
                    defined.add(_cstr(strtab, name_off))
        elif typ == _SHT_DYNAMIC and entsize:
            str_off, str_size = sections[link][1], sections[link][2]
            strtab = data[str_off:str_off + str_size]
            for pos in range(offset, offset + size, entsize):
                tag, val = struct.unpack_from(dyn_fmt, data, pos)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    needed.append(_cstr(strtab, val))
    return defined, needed


def private_libstdcxx_symbols(path: str) -> List[str]:
    """The C++ runtime symbols that ``path`` defines itself (readable names); empty when it has no copy."""
    defined, _ = elf_symbols(path)
    return sorted(readable for mangled, readable in LIBSTDCXX_MARKERS.items() if mangled in defined)


def check_extension(path: str) -> None:
    """Raise ``LinkageError`` if the shared library ``path`` carries its own copy of libstdc++."""
    found = private_libstdcxx_symbols(path)
    if found:
        raise LinkageError(
            f"{path} defines C++ runtime symbols ({', '.join(found)}): libstdc++ was linked into it "
            "statically (-static-libstdc++ in LDFLAGS, or the compiler's default). Next to the "
            "libstdc++.so.6 that torch loads, that copy fails to format numbers in error messages "
            "or crashes. Link against the shared libstdc++.so.6 that torch uses (setup.py passes it "
            "after the objects; check that the link line ends with it and that nothing after it "
            "brings libstdc++.a), or build with the system compiler (CXX=g++)."
        )
