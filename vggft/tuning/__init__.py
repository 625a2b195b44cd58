"""Commands that train many heads on cached rows: sweep, lr-find, kfold, label-issues."""
