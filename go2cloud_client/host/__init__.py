"""What the agent changes on the host it runs on, and how each change is undone.

Modules: ``prep`` (host preparation at import: rsync, the snapshot driver's tools, SELinux, the
block capability report), ``service`` (service mode: the systemd unit, starting and stopping the
agent in the background) and ``changes`` (the host change journal, ``state/host_changes.json``:
every change the other two made, with what undoes it; ``uninstall`` reverts them newest first).
"""
