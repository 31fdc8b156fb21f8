from qwenkit.cli import main

raise SystemExit(main())
