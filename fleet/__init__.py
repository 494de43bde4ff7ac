"""The fleet controller (`edge-fleet`): talks to devices only through the MQTT wire contract."""
