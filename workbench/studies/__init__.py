"""The six studies (counting, visual, drift, SAE, tuned lens + patching, encoded vs expressed) and notebook configs."""
