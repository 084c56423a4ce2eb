"""Hardware probes, cost model, routing traces and simulator."""
