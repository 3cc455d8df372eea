"""A device on MQTT, as iotd expects it (paho-mqtt 2): status with a will, readings, commands answered.

    python examples/mqtt_device.py --host 127.0.0.1 --port 1883 --device GATE-01
"""

import argparse
import json
import time

from paho.mqtt import client as mqtt

args = argparse.ArgumentParser()
args.add_argument("--host", default="127.0.0.1")
args.add_argument("--port", type=int, default=1883)
args.add_argument("--device", default="GATE-01")  # its identifier in iotd (upper case)
args.add_argument("--tenant", default="default")
args.add_argument("--username")
args.add_argument("--password")
opts = args.parse_args()
base = f"iotd/{opts.tenant}/{opts.device}"

device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=opts.device)
if opts.username:
    device.username_pw_set(opts.username, opts.password)
device.will_set(f"{base}/status", "offline", qos=1, retain=True)  # the broker says it when we vanish


def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(f"{base}/commands", qos=1)
    client.publish(f"{base}/status", "online", qos=1, retain=True)


def on_message(client, userdata, message):
    command = json.loads(message.payload)  # {"id", "verb"?, "endpoint", "body"?, ...}
    response = {"endpoint": command["endpoint"], "done": True}  # ... run it here ...
    client.publish(f"{base}/commands/result", json.dumps({"id": command["id"], "response": response}), qos=1)


device.on_connect, device.on_message = on_connect, on_message
device.connect(opts.host, opts.port, keepalive=30)
device.loop_start()
while True:
    reading = {"data": {"temperature": 21.5, "door": "closed"}}
    device.publish(f"{base}/readings", json.dumps(reading), qos=1).wait_for_publish()
    time.sleep(10)
