from nvml_exporter.remediator.cli import main

raise SystemExit(main())
