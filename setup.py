"""Build script: the Python package plus the optional C++/CUDA extension ``contrastive_ops._C``."""
from setuptools import setup


def extensions():
    return [], {}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
