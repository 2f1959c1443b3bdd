"""The controller: starts and watches the workers, restarts dead ones, reports their load."""
