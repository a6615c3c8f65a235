// Shared helpers for server.mjs and client.mjs: CLI parsing, transport
// option switch (Nest's own option names) and a logger that writes to stderr.
import { Transport } from '@nestjs/microservices';

export function parseArgs(argv) {
  const args = { transport: 'tcp' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) {
      throw new Error(`unexpected argument: ${arg}`);
    }
    let key = arg.slice(2);
    let value;
    const eq = key.indexOf('=');
    if (eq !== -1) {
      value = key.slice(eq + 1);
      key = key.slice(0, eq);
    } else if (key === 'verbose') {
      value = true;
    } else {
      value = argv[++i];
      if (value === undefined) {
        throw new Error(`missing value for --${key}`);
      }
    }
    args[key] = value;
  }
  return args;
}

const DEFAULT_URLS = {
  redis: 'redis://127.0.0.1:6379',
  nats: 'nats://127.0.0.1:4222',
  mqtt: 'mqtt://127.0.0.1:1883',
  rmq: 'amqp://127.0.0.1:5672',
  kafka: '127.0.0.1:9092',
};

/**
 * The pattern of server.mjs's `cmd` handlers. Kafka topic names allow only
 * [A-Za-z0-9._-], so an object pattern cannot be a topic there: on Kafka the
 * handler for {cmd: X} is registered as 'cmd.X' instead.
 */
export function commandPattern(kind, name) {
  return kind === 'kafka' ? `cmd.${name}` : { cmd: name };
}

/**
 * The bench peers' --pattern: a JSON object ('{"cmd":"sum"}', the default) or,
 * as Kafka needs, a plain topic name such as 'bench.sum.1.a'.
 */
export function benchPattern(text) {
  const value = String(text ?? '{"cmd":"sum"}');
  return value.trimStart().startsWith('{') ? JSON.parse(value) : value;
}

/**
 * The bench peers' transport options: server.mjs's, plus a RabbitMQ queue that
 * is neither durable nor kept once its consumer leaves (the benchmark names a
 * fresh queue per pair, and must leave none behind on a shared broker). The
 * Python side declares it with the same options, as RabbitMQ requires.
 */
export function benchTransportOptions(args) {
  const built = buildTransportOptions(args);
  if (built.kind === 'rmq') {
    built.options.queueOptions = { durable: false, autoDelete: true };
  }
  return built;
}

export const SERVER_COMMANDS = [
  'sum', 'echo', 'nothing', 'stream', 'stream_err', 'rpc_str', 'rpc_obj', 'boom',
  'async_sum', 'ctx', 'events',
];

/** Every pattern server.mjs answers on Kafka: what client.mjs subscribes replies of. */
export const KAFKA_REPLY_PATTERNS = ['ping', ...SERVER_COMMANDS.map(c => `cmd.${c}`)];

/**
 * Maps CLI args to { transport, options, kind } as accepted by both
 * NestFactory.createMicroservice and ClientProxyFactory.create.
 */
export function buildTransportOptions(args) {
  const kind = String(args.transport || 'tcp').toLowerCase();
  switch (kind) {
    case 'tcp':
      return {
        kind,
        transport: Transport.TCP,
        options: {
          host: args.host ?? '127.0.0.1',
          port: args.port !== undefined ? Number(args.port) : 3000,
        },
      };
    case 'redis': {
      let host = args.host;
      let port = args.port !== undefined ? Number(args.port) : undefined;
      if (args.url) {
        const u = new URL(args.url);
        host = host ?? u.hostname;
        port = port ?? (u.port ? Number(u.port) : 6379);
      }
      return {
        kind,
        transport: Transport.REDIS,
        options: { host: host ?? '127.0.0.1', port: port ?? 6379 },
      };
    }
    case 'nats':
      return {
        kind,
        transport: Transport.NATS,
        options: { servers: [args.url ?? DEFAULT_URLS.nats] },
      };
    case 'mqtt':
      return {
        kind,
        transport: Transport.MQTT,
        options: { url: args.url ?? DEFAULT_URLS.mqtt },
      };
    case 'rmq':
      return {
        kind,
        transport: Transport.RMQ,
        options: {
          urls: [args.url ?? DEFAULT_URLS.rmq],
          queue: args.queue ?? 'nestpy_queue',
        },
      };
    case 'kafka': {
      // Brokers are host:port, comma-separated (no URL scheme). The test broker
      // is Tansu, which holds a group join until half the session timeout has
      // passed (in 1 s steps) and answers a fetch only once its wait is half
      // over, so the kafkajs defaults (sessionTimeout 30 s, maxWaitTimeInMs 5 s)
      // would mean a 15 s join and replies seconds late.
      process.env.KAFKAJS_NO_PARTITIONER_WARNING = '1';
      const brokers = String(args.url ?? DEFAULT_URLS.kafka)
        .split(',')
        .map(b => b.trim())
        .filter(Boolean);
      return {
        kind,
        transport: Transport.KAFKA,
        options: {
          client: {
            clientId: args['client-id'] ?? 'nestpy-interop',
            brokers,
            retry: { initialRetryTime: 100, retries: 8 },
          },
          consumer: {
            groupId: args.group ?? 'nestpy-interop',
            sessionTimeout: 1500,
            heartbeatInterval: 250,
            rebalanceTimeout: 4000,
            maxWaitTimeInMs: 20,
            metadataMaxAge: 1000,
          },
          producer: { metadataMaxAge: 1000 },
        },
      };
    }
    default:
      throw new Error(`unsupported transport: ${kind}`);
  }
}

/** LoggerService that writes every line to stderr (stdout stays protocol-only). */
export class StderrLogger {
  constructor(levels) {
    this.levels = new Set(levels ?? ['log', 'error', 'warn', 'debug', 'verbose', 'fatal']);
  }

  setLogLevels(levels) {
    this.levels = new Set(levels);
  }

  write(level, message, rest) {
    if (!this.levels.has(level)) {
      return;
    }
    const parts = [message, ...rest].map(part =>
      part instanceof Error
        ? part.stack || part.message
        : typeof part === 'string'
          ? part
          : safeJson(part),
    );
    process.stderr.write(`[Nest] ${level.toUpperCase()} ${parts.join(' ')}\n`);
  }

  log(message, ...rest) { this.write('log', message, rest); }
  error(message, ...rest) { this.write('error', message, rest); }
  warn(message, ...rest) { this.write('warn', message, rest); }
  debug(message, ...rest) { this.write('debug', message, rest); }
  verbose(message, ...rest) { this.write('verbose', message, rest); }
  fatal(message, ...rest) { this.write('fatal', message, rest); }
}

function safeJson(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/**
 * Resolve at the consumer's first completed fetch. kafkajs's consumer.run(), the
 * last step of Nest's Kafka listen() and connect(), returns before the group is
 * joined; a new group then starts each partition at its latest offset, so a
 * record written before that (a request, or its reply) was skipped, and its
 * caller timed out (1 run in 6 of test_a_null_reply_is_one_null_value_for_both_clients).
 * A fetch comes after the join and the offsets.
 */
export function firstFetch(consumer) {
  return new Promise(resolve => {
    const remove = consumer.on(consumer.events.FETCH, () => {
      remove();
      resolve();
    });
  });
}

/**
 * Serve, then tell the parent process on stdout: exactly one line, "READY <port>"
 * (the bound port for TCP, 0 for brokers), which the Python side waits for.
 */
export async function listenAndAnnounce(app, kind) {
  await app.listen();
  if (kind === 'kafka') {
    await firstFetch(app.unwrap()[1]);
  }
  let port = 0;
  if (kind === 'tcp') {
    const address = app.unwrap().address();
    port = address && typeof address === 'object' ? address.port : 0;
  }
  process.stdout.write(`READY ${port}\n`);
}
