"""Training: chat-template loss masks, configs, the DPO loss and log-prob backends, and the pieces
the BC and DPO recipes share, one module per purpose (distributed, data, model_loading,
optimization, checkpointing, metric_logging)."""
