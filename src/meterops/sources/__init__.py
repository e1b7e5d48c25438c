"""Sources: where readings come from (file replay, the fleet simulator, HTTP pollers)."""
