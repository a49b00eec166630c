"""The device side: drafters (``middleware.nodes.drafters``) and the device session loop."""
