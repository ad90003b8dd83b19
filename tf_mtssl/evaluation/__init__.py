"""Transfer evaluations of a pretrained trunk (paper_spec 7): the linear probe (`linear`, paper_spec
7.1) and depth fine-tuning (`depth`, paper_spec 7.3); `common` loads the trunk to evaluate."""
