"""The optogenetic-trigger controller: trigger policies that turn forecasts into decisions, the safety interlocks that
may suppress them (pure logic, explicit clock), and the controller process that applies both and publishes triggers over
MQTT. Imports only realtime.wire and realtime.metrics."""
