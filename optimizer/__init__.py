"""Query analysis without the service: fingerprints, features, rewrites, what-if indexes. Some
modules may be served by a compiled build (`optimizer.compiled`)."""

from .compiled import install as _install_compiled

_install_compiled()
