from twisted.application.service import ServiceMaker

iotd = ServiceMaker(
    "iotd",
    "iotd.tap",
    "IoT device gateway: push commands, device links, event streams, subscriptions",
    "iotd",
)
