"""Build script: the Python package plus the optional C++/CUDA extension ``contrastive_ops._C``.

Environment variables (read once, printed as the resolved build configuration):

``CONTRASTIVE_OPS_SKIP_EXT=1``   pure-Python install, no extension (backends "cpu"/"cuda" unavailable).
``CONTRASTIVE_OPS_CPU_ONLY=1``   build only the CPU kernels even where CUDA could be built.
``FORCE_CUDA=1``                 build the CUDA kernels even without a visible GPU (needs nvcc).
``TORCH_CUDA_ARCH_LIST``         CUDA architectures (default: the local GPU's, or "9.0" without one).
``MAX_JOBS``                     parallel compile jobs (default: from CPU cores and free memory).
``CUDA_HOME``                    the CUDA toolkit (default: torch's detection, nvcc on PATH).

Sources: every ``csrc/**/*.cpp`` (those under ``csrc/cuda/`` only with CUDA) and,
with CUDA, every ``csrc/**/*.cu``.  Recommended install, against the torch
already installed: ``pip install --no-build-isolation .``
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PKG = "contrastive_ops"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_jobs():
    """Parallel jobs: one per core, at most one per 3 GiB of available memory (nvcc is hungry)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / 2**20
        return max(1, min(cores, int(avail_gib // 3)))
    except (OSError, KeyError, ValueError):
        return max(1, min(cores, 4))


def _openmp_flags(torch):
    """-fopenmp when torch's ATen parallel backend is OpenMP and the compiler is GCC-like."""
    if os.name == "nt" or sys.platform == "darwin" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _linkcheck():
    """``contrastive_ops/_linkcheck.py``, loaded from its file (the package itself imports torch & co.)."""
    spec = importlib.util.spec_from_file_location("_contrastive_ops_linkcheck", os.path.join(ROOT, PKG, "_linkcheck.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _libstdcxx_link_flags():
    """Link the C++ runtime as the shared libstdc++.so, never as a private static copy (ELF platforms).

    The extension runs in a process where torch has already loaded
    libstdc++.so.6.  A toolchain that links libstdc++ statically (an explicit
    -static-libstdc++ in LDFLAGS, a compiler built with it as its default, or
    one whose library directory holds only libstdc++.a) puts a second copy of
    the runtime into _C.so.  The two copies do not stay
    apart: the std::locale facet ids are STB_GNU_UNIQUE symbols that the loader
    merges process-wide, and Python's -Wl,-Bsymbolic-functions binds our calls to
    the private functions, so the private locale code indexes its tables with the
    other copy's ids.  Formatting an integer into a stream then fails: every
    TORCH_CHECK message with a number in it is cut short, or the process crashes
    in std::ostream::_M_insert<long> (seen with a GCC 13 toolchain on Ubuntu 24.04).

    Hiding the copy instead (-Wl,--exclude-libs) would keep it self-consistent
    but leave two C++ runtimes, with their own exception handling and
    std::terminate, under torch's exceptions that cross our frames; dropping
    -Bsymbolic-functions does not help either (the merged facet ids remain).
    So: name the libstdc++.so.6 that torch runs on (the file this process has
    loaded) on the link line after the objects, behind -Wl,-Bdynamic
    (_linkcheck.link_args).  The linker resolves every runtime symbol of our
    objects against it and records it as NEEDED; a libstdc++.a that the driver
    appends after it then supplies nothing.  A plain -lstdc++ would not do: a
    toolchain whose library directory holds only libstdc++.a resolves it to the
    archive.  The built library is checked afterwards (BuildExt.run): one that
    still defines C++ runtime symbols fails the build with an error instead of
    being installed and crashing.
    """
    if os.name == "nt" or sys.platform == "darwin":
        return []
    return _linkcheck().link_args()


def _nvidia_include_dirs():
    """Headers shipped by torch's nvidia-* wheels (cuBLAS & co. that ATen/cuda headers include)."""
    dirs = []
    for base in sys.path:
        for d in sorted(glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _has_headers(home):
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _cuda_toolkit(ce):
    """The CUDA toolkit to build with: torch's detection, if it holds the CUDA headers.

    torch derives CUDA_HOME from ``which nvcc`` when the variable is unset; a
    wrapper script such as /usr/local/bin/nvcc then yields /usr/local, which
    has no headers.  In that case look in the usual places (/usr/local/cuda,
    /usr/local/cuda-*) and use the first real toolkit found (printed in the
    build configuration).
    """
    home = ce.CUDA_HOME
    if home is None or _has_headers(home) or os.environ.get("CUDA_HOME"):
        return home
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if _has_headers(cand) and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            print(f"contrastive_ops build: {home} has no CUDA headers; using the toolkit at {cand}")
            ce.CUDA_HOME = cand
            os.environ["CUDA_HOME"] = cand
            return cand
    print(f"contrastive_ops build: {home} has no CUDA headers and no toolkit was found; set CUDA_HOME")
    return None


def _write_build_info(with_ext, with_cuda):
    import torch

    text = (
        '"""Written by setup.py at build time: the torch the extension was compiled against."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_EXT = {bool(with_ext)!r}\n"
        f"WITH_CUDA = {bool(with_cuda)!r}\n"
    )
    path = os.path.join(ROOT, PKG, "_build_info.py")
    with open(path, "w") as f:
        f.write(text)
    return text


def extensions():
    if _flag("CONTRASTIVE_OPS_SKIP_EXT"):
        print("contrastive_ops build: CONTRASTIVE_OPS_SKIP_EXT=1, pure-Python install (no extension)")
        try:
            _write_build_info(False, False)
        except ImportError:
            pass
        return [], {}

    import torch
    from torch.utils import cpp_extension as ce

    force_cuda = _flag("FORCE_CUDA")
    cpu_only = _flag("CONTRASTIVE_OPS_CPU_ONLY")
    cuda_home = _cuda_toolkit(ce)
    nvcc = cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    with_cuda = not cpu_only and torch.version.cuda is not None and (force_cuda or bool(nvcc))
    if force_cuda and not cpu_only and not nvcc:
        raise RuntimeError("FORCE_CUDA=1 but no nvcc was found: set CUDA_HOME to a CUDA toolkit")
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError(f"FORCE_CUDA=1 but the installed torch {torch.__version__} has no CUDA support")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    else:
        sources = [s for s in sources if not s.startswith(cuda_dir)]

    include_dirs = [os.path.join(ROOT, "csrc")]
    nvidia_dirs = _nvidia_include_dirs() if with_cuda else []
    # -ffp-contract=off: the backward recomputes S = scale·G and must round it exactly as the
    # forward did (an FMA-contracted scale·G − lse differs by up to half an ulp of S, which at
    # logits ~1e8 is exp(4) in the softmax weights).
    extra = {"cxx": ["-O3", "-ffp-contract=off"]}  # the C++ standard is the one torch asks for
    # The CPU kernels split their work with at::parallel_for, an inline template
    # whose OpenMP pragmas are only honoured when this extension is compiled with
    # OpenMP too (otherwise every part runs on the calling thread).  At run time
    # libgomp.so.1 resolves to the copy torch has already loaded.
    openmp = _openmp_flags(torch)
    extra["cxx"] += openmp
    link_args = list(openmp) + _libstdcxx_link_flags()
    if with_cuda:
        include_dirs += nvidia_dirs
        extra["nvcc"] = ["-O3", "-lineinfo"] + [f for o in openmp for f in ("-Xcompiler", o)]
        ext_cls = ce.CUDAExtension
        extra["cxx"].append("-DCONTRASTIVE_OPS_WITH_CUDA")
    else:
        ext_cls = ce.CppExtension
    ext = ext_cls(
        name=f"{PKG}._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=link_args,
        py_limited_api=False,
    )
    _write_build_info(True, with_cuda)

    print("contrastive_ops build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"  extension: {'CUDAExtension (CPU + CUDA kernels)' if with_cuda else 'CppExtension (CPU kernels)'}")
    if with_cuda:
        print(f"  CUDA_HOME={cuda_home}  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(local GPU)')}")
        print(f"  extra include dirs: {nvidia_dirs}")
    print(f"  OpenMP: {' '.join(openmp) if openmp else 'off (the CPU kernels run on one thread)'}")
    print(f"  extra link args: {' '.join(link_args) if link_args else '(none)'}")
    print(f"  MAX_JOBS={os.environ['MAX_JOBS']}  sources={sources}")

    class BuildExt(ce.BuildExtension):
        def run(self):
            super().run()
            if sys.platform.startswith("linux"):
                check = _linkcheck()
                for e in self.extensions:
                    path = self.get_ext_fullpath(e.name)
                    try:
                        check.check_extension(path)
                    except check.LinkageError:
                        os.remove(path)  # leave no library behind that would crash when imported
                        raise
            # build_py may already have copied the package: make sure the
            # installed copy carries the build info of this build.
            src = os.path.join(ROOT, PKG, "_build_info.py")
            dst_dir = os.path.join(self.build_lib, PKG)
            if not self.inplace and os.path.isdir(dst_dir):
                with open(src) as f, open(os.path.join(dst_dir, "_build_info.py"), "w") as g:
                    g.write(f.read())

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
