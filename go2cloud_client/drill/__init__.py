"""The drill: the checks a source runs before its migration starts (``go2cloud_client check`` and
the ``drill`` command). :mod:`.model` (items and the report), :mod:`.checks` (one function per
check), :mod:`.runner` (runs them), :mod:`.initramfs` (lists an initramfs), :mod:`.command`
(the CLI command)."""
