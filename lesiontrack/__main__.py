"""``python -m lesiontrack``: the console command without the installed script."""

from lesiontrack.cli import main

main()
