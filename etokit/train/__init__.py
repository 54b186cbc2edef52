"""Training: chat-template loss masks, configs, and the helpers the BC and DPO recipes share."""
