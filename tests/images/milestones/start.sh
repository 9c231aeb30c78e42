#!/bin/sh
# Log lines for milestone/log-pattern tests, then serve on 8080.
echo "step 1/4"
sleep 0.3
echo "checkpoint complete"
echo "step 2/4"
sleep 0.3
echo "checkpoint complete"
echo "step 3/4"
sleep 0.3
echo "checkpoint complete"
echo "step 4/4"
sleep 0.3
echo "ready"
# not `exec httpd`: httpd as PID 1 would ignore SIGTERM (see web/Dockerfile)
trap 'kill $p; wait $p 2>/dev/null; exit 0' TERM INT
httpd -f -p 8080 -h /var/www &
p=$!
wait $p
