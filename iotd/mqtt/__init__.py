"""MQTT: iotd as one client of a broker -- devices' publishes become events, commands go down.

Modules: :mod:`~iotd.mqtt.broker` (``[mqtt] broker`` read), :mod:`~iotd.mqtt.topics`
(the topic map), :mod:`~iotd.mqtt.payloads` (what a payload means),
:mod:`~iotd.mqtt.connection` (paho driven by the reactor), :mod:`~iotd.mqtt.ingest`
(commit, then acknowledge), :mod:`~iotd.mqtt.commands` (the push lifecycle over
MQTT), :mod:`~iotd.mqtt.service` (the job).  Spec: ``shared/spec/60-mqtt.md``.
"""
