// A producer in another language, for tests/e2e/test_foreign_clients.py.
//   node foreign_client.js celery-node <redis-url> <queue> <task> <kwargs-json>
//   node foreign_client.js amqp        <amqp-url>  <queue> <task> <kwargs-json>
// Prints the task id once the message is on the broker.
"use strict";
const crypto = require("crypto");

const [, , mode, url, queue, task, kwargsJson] = process.argv;
const kwargs = JSON.parse(kwargsJson);

async function viaCeleryNode() {
  const celery = require("celery-node");
  const client = celery.createClient(url, url, queue);
  await client.isReady();
  const result = client.sendTask(task, [], kwargs);
  // sendTask publishes on a later tick; ioredis runs commands in order, so QUIT
  // (disconnect) goes after the LPUSH once that tick has run.
  await new Promise((resolve) => setImmediate(resolve));
  await client.disconnect();
  return result.taskId;
}

// celery-node 0.5.9 cannot publish to Jobsite's RabbitMQ: before each send it
// declares the exchange "default" as auto-delete and the queue without
// x-max-priority, and RabbitMQ refuses both (406 PRECONDITION_FAILED) because Jobsite
// declared them durable and with x-max-priority 10. So a minimal Celery message
// protocol 2 (https://docs.celeryq.dev/en/stable/internals/protocol.html), by hand,
// published to the existing exchange without declaring anything.
async function viaAmqp() {
  const amqp = require("amqplib");
  const id = crypto.randomUUID();
  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  let returned = false; // unroutable (mandatory): RabbitMQ returns it before the ack
  channel.on("return", () => {
    returned = true;
  });
  const body = [[], kwargs, { callbacks: null, errbacks: null, chain: null, chord: null }];
  channel.publish("default", queue, Buffer.from(JSON.stringify(body)), {
    contentType: "application/json",
    contentEncoding: "utf-8",
    correlationId: id,
    deliveryMode: 2,
    mandatory: true,
    headers: { lang: "js", task, id, root_id: id, parent_id: null, group: null },
  });
  await channel.waitForConfirms();
  await connection.close();
  if (returned) throw new Error(`no queue is bound to "default" with key ${queue}`);
  return id;
}

(mode === "amqp" ? viaAmqp() : viaCeleryNode()).then(
  (id) => console.log(id),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
