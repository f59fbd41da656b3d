"""From a pruned model to a deployment: checkpoints transformers 5 and vLLM load, the report
written beside them (``save_hook``, ``report_writer``), 2:4 tensors for torch's sparse kernels."""
