// rabbitry's peers scenario, Node's side: end to end with amqplib, shaped
// as the benchmark's other clients do it. The consumer and the publisher
// have a connection each; 256-byte transient bodies without confirms;
// prefetch 500 and an ack per message. Prints {"ms": ..., "cpu_ms": ...}:
// the time from the first publish to the last ack, and this process's CPU
// time over the same span.
//
//   node amqplib_end_to_end.js URL QUEUE N
const amqp = require('amqplib');

async function main() {
  const [url, queue, count] = process.argv.slice(2);
  const n = Number(count);
  const consuming = await amqp.connect(url);
  const publishing = await amqp.connect(url);
  const consumer = await consuming.createChannel();
  await consumer.prefetch(500);
  const publisher = await publishing.createChannel();
  const body = Buffer.alloc(256, 'x');
  let got = 0;
  let finished;
  const done = new Promise((resolve) => { finished = resolve; });
  await consumer.consume(queue, (msg) => {
    consumer.ack(msg);
    got += 1;
    if (got === n) finished();
  }, { noAck: false });
  const cpu = process.cpuUsage();
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i += 1) {
    // publish() says false when its buffer is full: wait for it to drain.
    if (!publisher.publish('', queue, body, { deliveryMode: 1 })) {
      await new Promise((resolve) => publisher.once('drain', resolve));
    }
  }
  await done;
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  const used = process.cpuUsage(cpu);
  console.log(JSON.stringify({ ms, cpu_ms: (used.user + used.system) / 1000 }));
  await consumer.close();
  await publisher.close();
  await consuming.close();
  await publishing.close();
}

main().catch((e) => {
  console.error(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
