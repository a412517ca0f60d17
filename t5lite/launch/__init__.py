"""Launchers: start the processes of one multi-process run. `local` runs them on this machine;
the cluster launchers are shell scripts in the repository's launch/ folder."""
