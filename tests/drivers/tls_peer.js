// A TLS peer on Node's tls module, for tests: an echo server, or a client
// that streams bytes and checks their echo.  Node built-ins only.
//
// It prints, one line each, on stdout:
//
//   READY port=N                            (server, once listening)
//   HANDSHAKE n=N version=TLSv1.2           (each handshake this side took
//                                           part in, counted from its
//                                           'keylog' lines: one CLIENT_RANDOM
//                                           per TLS 1.2 handshake, one
//                                           CLIENT_TRAFFIC_SECRET_0 per TLS
//                                           1.3 one; n > 1 is a renegotiation)
//   REKEY n=N                               (--rekey-every: renegotiate(),
//                                           TLS 1.2 only)
//   CLOSED n=N bytes=N sha256=HEX           (server, each connection)
//   RESULT bytes=N sha256=HEX match=B       (client)
//
// and any error on stderr ("ERROR ..."), exiting 1.  Node does not tell the
// application about KeyUpdates it receives.
//
// It must never listen anywhere but loopback and always ends within
// --timeout.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const tls = require('tls');

const opts = {};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  if (!argv[i].startsWith('--') || i + 1 >= argv.length) {
    fail(new Error(`options are --name value pairs: ${argv[i]}`));
  }
  opts[argv[i].slice(2)] = argv[i + 1];
}
const opt = (name, fallback) => (name in opts ? opts[name] : fallback);

function say(line) {
  fs.writeSync(1, line + '\n');
}

function fail(err) {
  fs.writeSync(2, `ERROR ${err && err.stack ? err.message : err}\n`);
  process.exit(1);
}

function version(v) {
  if (v !== '1.2' && v !== '1.3') fail(new Error(`TLS version must be 1.2 or 1.3, not ${v}`));
  return `TLSv${v}`;
}

const host = opt('host', '127.0.0.1');
if (!net.isIP(host) || !(host.startsWith('127.') || host === '::1')) {
  fail(new Error(`loopback addresses only, not ${host}`));
}
const timeout = Number(opt('timeout', '30'));
setTimeout(() => fail(new Error(`still running after ${timeout} s`)), timeout * 1000).unref();

const common = {
  minVersion: version(opt('tls-min', '1.2')),
  maxVersion: version(opt('tls-max', '1.3')),
};
if ('cert' in opts) {
  common.cert = fs.readFileSync(opts.cert);
  common.key = fs.readFileSync(opts.key);
}
if ('ca' in opts) common.ca = fs.readFileSync(opts.ca);

function watch(sock) {
  let n = 0;
  sock.on('keylog', (line) => {
    const label = line.toString().split(' ')[0];
    if (label === 'CLIENT_RANDOM' || label === 'CLIENT_TRAFFIC_SECRET_0') {
      n += 1;
      say(`HANDSHAKE n=${n} version=${sock.getProtocol()}`);
    }
  });
}

function startRekeys(sock) {
  const every = Number(opt('rekey-every', '0'));
  if (every <= 0) return;
  let n = 0;
  const timer = setInterval(() => {
    sock.renegotiate({}, (err) => {
      if (err) fail(err);
      n += 1;
      say(`REKEY n=${n}`);
    });
  }, every);
  sock.on('close', () => clearInterval(timer));
}

function serve() {
  const accept = Number(opt('accept', '1'));
  let served = 0;
  const server = tls.createServer(common);
  server.on('tlsClientError', fail);
  server.on('secureConnection', (sock) => {
    const n = ++served;
    if (served >= accept) server.close();
    startRekeys(sock);
    const digest = crypto.createHash('sha256');
    let count = 0;
    sock.on('data', (data) => {
      digest.update(data);
      count += data.length;
      sock.write(data);
    });
    sock.on('error', fail);
    sock.on('end', () => {
      say(`CLOSED n=${n} bytes=${count} sha256=${digest.digest('hex')}`);
      sock.end();
    });
  });
  // keylog fires on the server for each connection's handshakes.
  server.on('keylog', (line, sock) => {
    sock.handshakes = (sock.handshakes || 0);
    const label = line.toString().split(' ')[0];
    if (label === 'CLIENT_RANDOM' || label === 'CLIENT_TRAFFIC_SECRET_0') {
      sock.handshakes += 1;
      say(`HANDSHAKE n=${sock.handshakes} version=${sock.getProtocol()}`);
    }
  });
  server.listen(0, host, () => say(`READY port=${server.address().port}`));
}

function client() {
  const total = Number(opt('bytes', String(1 << 20)));
  const chunk = Number(opt('chunk', '16384'));
  const pace = Number(opt('pace-ms', '0'));
  const sock = tls.connect({
    ...common, host, port: Number(opt('port', '0')), servername: opt('server-name', 'localhost'),
  });
  watch(sock);
  sock.on('error', fail);
  const sent = crypto.createHash('sha256');
  const received = crypto.createHash('sha256');
  let count = 0;
  // once: Node emits it again after each renegotiation.
  sock.once('secureConnect', () => {
    startRekeys(sock);
    let left = total;
    const writeSome = () => {
      while (left > 0) {
        const buf = crypto.randomBytes(Math.min(left, chunk));
        left -= buf.length;
        sent.update(buf);
        const more = sock.write(buf);
        if (pace > 0) {
          setTimeout(writeSome, pace);
          return;
        }
        if (!more) {
          sock.once('drain', writeSome);
          return;
        }
      }
    };
    writeSome();
  });
  sock.on('data', (data) => {
    received.update(data);
    count += data.length;
    if (count >= total) {
      const a = sent.digest('hex');
      const b = received.digest('hex');
      say(`RESULT bytes=${count} sha256=${b} match=${a === b}`);
      if (a !== b) fail(new Error('the echo differs from what was sent'));
      sock.end();
    }
  });
  sock.on('end', () => {
    if (count < total) fail(new Error(`closed after ${count} of ${total} bytes`));
  });
}

const role = opt('role', 'client');
if (role === 'server') serve();
else if (role === 'client') client();
else fail(new Error('--role must be server or client'));
