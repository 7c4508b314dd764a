"""Shadow testing: replay stored traffic against candidate models, and a replay server to stand in for them."""
