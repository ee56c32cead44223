"""One module per kind of fault; each scenario is ``run(workdir, size) -> Findings``."""
