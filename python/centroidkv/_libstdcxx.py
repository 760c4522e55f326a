"""Links the compiled kernels against the shared libstdc++ the process already uses, and checks
the result.

Why: a toolchain that links libstdc++ statically (a `-static-libstdc++` default, or a library
folder that offers only libstdc++.a) puts a second copy of libstdc++'s stream and locale code into
the extension. That copy's locale facets are not the ones the process initialised, so formatting
a number into an error message prints nothing on one machine and crashes the process on another.
`-lstdc++` cannot prevent it (the linker takes the first libstdc++.* it finds), so the build names
the shared library by path and then refuses an extension that still carries its own copy.

Used by setup.py, by CMakeLists.txt (`python _libstdcxx.py path|check LIB`) and by the JIT build;
it imports nothing from centroidkv, so it runs before the kernels exist.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys

OVERRIDE = "CENTROIDKV_LIBSTDCXX"

# Mangled-name prefixes of libstdc++'s stream and locale classes: std::ostream / std::istream
# members, std::ios_base, std::basic_ios, std::locale and its facets (num_put, num_get, ctype).
# Header-only code never defines them: libstdc++ declares these instantiations extern.
RUNTIME_PREFIXES = ("_ZNSo", "_ZNKSo", "_ZNSi", "_ZNKSi", "_ZNSt8ios_base", "_ZNKSt8ios_base",
                    "_ZNSt9basic_ios", "_ZNKSt9basic_ios", "_ZNSt6locale", "_ZNKSt6locale",
                    "_ZNKSt7num_put", "_ZNKSt7num_get", "_ZNSt7num_put", "_ZNSt5ctypeIcE",
                    "_ZNKSt5ctypeIcE")


class LinkError(RuntimeError):
    pass


def process_libstdcxx() -> str | None:
    """Path of the libstdc++ shared library mapped into this process (after importing torch, the
    one torch uses), else None."""
    try:
        import torch  # noqa: F401  (torch's libraries pull libstdc++ in)
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return fields[-1]
    except OSError:
        pass
    return None


def compiler_libstdcxx(compiler: str = "c++") -> str | None:
    """The compiler's own libstdc++.so.6, where it has one."""
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def shared_libstdcxx() -> str | None:
    """The shared libstdc++ to link: $CENTROIDKV_LIBSTDCXX, else the process's, else the
    compiler's. None off Linux (other platforms have no libstdc++ problem to fix)."""
    if not sys.platform.startswith("linux"):
        return None
    chosen = os.environ.get(OVERRIDE)
    if chosen:
        if not os.path.exists(chosen):
            raise LinkError(f"{OVERRIDE}={chosen}: no such file")
        return chosen
    return process_libstdcxx() or compiler_libstdcxx()


def link_args() -> list[str]:
    """Linker arguments that resolve libstdc++ from its shared library. A path on the link line
    comes before the driver's own -lstdc++, so every symbol resolves there first."""
    path = shared_libstdcxx()
    return [] if path is None else [path]


# --- ELF reading (64-bit little-endian, the only Linux ABI torch ships wheels for) -----------

def _sections(data: bytes):
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]

    def name(offset):
        return data[names_offset + offset:data.index(b"\0", names_offset + offset)].decode()
    return {name(h[0]): h for h in headers}, headers


def _string(data: bytes, table_offset: int, offset: int) -> str:
    start = table_offset + offset
    return data[start:data.index(b"\0", start)].decode(errors="replace")


def read_elf(path: str) -> tuple[list[str], set[str]]:
    """(DT_NEEDED entries, names of the symbols the file defines) of a shared library."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise LinkError(f"{path} is not a 64-bit little-endian ELF file")
    by_name, headers = _sections(data)
    needed = []
    if ".dynamic" in by_name:
        dyn = by_name[".dynamic"]
        strtab = headers[dyn[6]][4]  # sh_link: the string table
        for offset in range(dyn[4], dyn[4] + dyn[5], 16):
            tag, value = struct.unpack_from("<qQ", data, offset)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                needed.append(_string(data, strtab, value))
    defined = set()
    for table in (".symtab", ".dynsym"):
        if table not in by_name:
            continue
        sym = by_name[table]
        strtab = headers[sym[6]][4]
        for offset in range(sym[4], sym[4] + sym[5], 24):
            st_name, _info, _other, st_shndx = struct.unpack_from("<IBBH", data, offset)
            if st_name and st_shndx != 0:  # SHN_UNDEF: referenced, not defined
                defined.add(_string(data, strtab, st_name))
    return needed, defined


def check_extension(path: str) -> None:
    """Raises LinkError if the library carries its own copy of libstdc++'s stream/locale code."""
    if not sys.platform.startswith("linux"):
        return
    needed, defined = read_elf(path)
    copied = sorted(s for s in defined if s.startswith(RUNTIME_PREFIXES))
    if copied:
        listed = any(name.startswith("libstdc++") for name in needed)
        raise LinkError(
            f"{path} carries its own copy of libstdc++'s stream/locale code ({len(copied)} symbols "
            f"such as {copied[0]}; libstdc++.so {'is' if listed else 'is not'} among its NEEDED "
            "libraries): the toolchain linked libstdc++ statically. Loaded next to torch, that copy "
            "crashes or garbles every error message that formats a number. Remove -static-libstdc++ "
            f"from LDFLAGS/CXXFLAGS, or set {OVERRIDE}=/path/to/libstdc++.so.6 (the one torch loads) "
            "and rebuild.")


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0] == "path":
        print(shared_libstdcxx() or "")
        return 0
    if len(argv) == 2 and argv[0] == "check":
        try:
            check_extension(argv[1])
        except LinkError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    print("usage: _libstdcxx.py path | check LIBRARY", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
