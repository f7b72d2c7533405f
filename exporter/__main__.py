from nvml_exporter.cli import main

raise SystemExit(main())
