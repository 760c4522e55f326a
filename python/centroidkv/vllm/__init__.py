"""CentroidKV inside vLLM (work in progress): the merge plan and the paged tensor work."""
