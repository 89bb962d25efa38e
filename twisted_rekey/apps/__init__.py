"""
The applications built on twisted_rekey: the twistd plugins ``rekey-echo``
(:mod:`twisted_rekey.apps.echo`) and ``rekey-tunnel``
(:mod:`twisted_rekey.apps.tunnel`), the probe
(:mod:`twisted_rekey.apps.probe`) and the ``twisted-rekey`` command
(:mod:`twisted_rekey.apps.cli`).

Each twistd plugin's module is its tap module, as in Twisted: it holds the
plugin's ``Options`` and ``makeService``.  What the plugins share is in
``_common``.

These modules use only the library's public API (``twisted_rekey`` and
``twisted_rekey.exceptions``), as any other application would, and the
library never imports them.  Their interface is the commands and their
options, not the Python names inside.
"""
