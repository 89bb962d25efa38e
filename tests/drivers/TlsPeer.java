// A TLS peer on Java's JSSE, for tests: an echo server, or a client that
// streams bytes and checks their echo.  JDK only; compiled by
// tests/foreign.py with javac into a cache directory.
//
// It prints, one line each, on stdout:
//
//   READY port=N                            (server, once listening)
//   HANDSHAKE n=N version=TLSv1.2 cipher=C  (each completed handshake, from
//                                           a HandshakeCompletedListener;
//                                           n > 1 is a renegotiation)
//   REKEY n=N                               (--rekey-every: SSLSocket
//                                           .startHandshake() again, which
//                                           renegotiates on TLS 1.2 and sends
//                                           a KeyUpdate on TLS 1.3)
//   CLOSED n=N bytes=N sha256=HEX           (server, each connection)
//   RESULT bytes=N sha256=HEX match=B       (client)
//
// and any error on stderr ("ERROR ..."), exiting 1.  JSSE does not tell the
// application about KeyUpdates it receives.
//
// It must never listen anywhere but loopback and always ends within
// --timeout.

import java.io.ByteArrayInputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.PrivateKey;
import java.security.SecureRandom;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public final class TlsPeer {
    private static final Map<String, String> opts = new HashMap<>();

    private static String opt(String name, String fallback) {
        return opts.getOrDefault(name, fallback);
    }

    private static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    private static void fail(Throwable e) {
        System.err.println("ERROR " + e);
        if (System.getenv("TLS_PEER_TRACE") != null) {
            e.printStackTrace();
        }
        System.err.flush();
        Runtime.getRuntime().halt(1);
    }

    private static String[] protocols() {
        String min = opt("tls-min", "1.2"), max = opt("tls-max", "1.3");
        List<String> out = new ArrayList<>();
        for (String v : new String[] {"1.2", "1.3"}) {
            if (v.compareTo(min) >= 0 && v.compareTo(max) <= 0) {
                out.add("TLSv" + v);
            }
        }
        if (out.isEmpty() || !List.of("1.2", "1.3").contains(min)
                || !List.of("1.2", "1.3").contains(max)) {
            throw new IllegalArgumentException(
                "--tls-min/--tls-max must be 1.2 or 1.3, min <= max");
        }
        return out.toArray(new String[0]);
    }

    private static byte[] pem(String text, String type) {
        String begin = "-----BEGIN " + type + "-----";
        String end = "-----END " + type + "-----";
        int a = text.indexOf(begin), b = text.indexOf(end);
        if (a < 0 || b < 0) {
            throw new IllegalArgumentException("no " + type + " in PEM input");
        }
        return Base64.getMimeDecoder().decode(text.substring(a + begin.length(), b));
    }

    private static SSLContext context() throws Exception {
        CertificateFactory x509 = CertificateFactory.getInstance("X.509");
        KeyManagerFactory kmf = null;
        if (opts.containsKey("cert")) {
            List<Certificate> chain = new ArrayList<>(x509.generateCertificates(
                new ByteArrayInputStream(Files.readAllBytes(Path.of(opt("cert", ""))))));
            byte[] der = pem(Files.readString(Path.of(opt("key", ""))), "PRIVATE KEY");
            PrivateKey key = null;
            for (String alg : new String[] {"EC", "RSA"}) {
                try {
                    key = KeyFactory.getInstance(alg).generatePrivate(new PKCS8EncodedKeySpec(der));
                    break;
                } catch (java.security.spec.InvalidKeySpecException e) {
                    // try the next algorithm
                }
            }
            if (key == null) {
                throw new IllegalArgumentException("--key: not a PKCS#8 EC or RSA key");
            }
            KeyStore ks = KeyStore.getInstance("PKCS12");
            ks.load(null, null);
            ks.setKeyEntry("peer", key, new char[0], chain.toArray(new Certificate[0]));
            kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
            kmf.init(ks, new char[0]);
        }
        TrustManagerFactory tmf = null;
        if (opts.containsKey("ca")) {
            KeyStore ts = KeyStore.getInstance("PKCS12");
            ts.load(null, null);
            ts.setCertificateEntry("ca", x509.generateCertificate(
                new ByteArrayInputStream(Files.readAllBytes(Path.of(opt("ca", ""))))));
            tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            tmf.init(ts);
        }
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf == null ? null : kmf.getKeyManagers(),
                 tmf == null ? null : tmf.getTrustManagers(), new SecureRandom());
        return ctx;
    }

    private static void watch(SSLSocket sock) {
        AtomicInteger n = new AtomicInteger();
        sock.addHandshakeCompletedListener(event -> say(
            "HANDSHAKE n=" + n.incrementAndGet() + " version=" + event.getSession().getProtocol()
            + " cipher=" + event.getCipherSuite()));
    }

    private static InetAddress loopback() throws Exception {
        InetAddress address = InetAddress.getByName(opt("host", "127.0.0.1"));
        if (!address.isLoopbackAddress()) {
            throw new IllegalArgumentException("loopback addresses only, not " + address);
        }
        return address;
    }

    private static void serve(SSLContext ctx) throws Exception {
        SSLServerSocket server = (SSLServerSocket) ctx.getServerSocketFactory().createServerSocket();
        server.bind(new InetSocketAddress(loopback(), 0));
        server.setEnabledProtocols(protocols());
        say("READY port=" + server.getLocalPort());
        int accept = Integer.parseInt(opt("accept", "1"));
        for (int i = 1; i <= accept; i++) {
            try (SSLSocket sock = (SSLSocket) server.accept()) {
                watch(sock);
                startRekeys(sock);
                MessageDigest digest = MessageDigest.getInstance("SHA-256");
                InputStream in = sock.getInputStream();
                OutputStream out = sock.getOutputStream();
                byte[] buf = new byte[65536];
                long count = 0;
                for (int got; (got = in.read(buf)) > 0; ) {
                    digest.update(buf, 0, got);
                    out.write(buf, 0, got);
                    out.flush();
                    count += got;
                }
                say("CLOSED n=" + i + " bytes=" + count + " sha256="
                    + HexFormat.of().formatHex(digest.digest()));
            }
        }
    }

    // --rekey-every MS: startHandshake() again on an established socket.
    private static void startRekeys(SSLSocket sock) {
        long every = Long.parseLong(opt("rekey-every", "0"));
        if (every <= 0) {
            return;
        }
        Thread t = new Thread(() -> {
            try {
                for (int n = 1; !sock.isClosed(); n++) {
                    Thread.sleep(every);
                    if (sock.isClosed()) {
                        return;
                    }
                    sock.startHandshake();
                    say("REKEY n=" + n);
                }
            } catch (Exception e) {
                if (!sock.isClosed()) {
                    fail(e);
                }
            }
        });
        t.setDaemon(true);
        t.start();
    }

    private static void client(SSLContext ctx) throws Exception {
        int total = Integer.parseInt(opt("bytes", "1048576"));
        int chunk = Integer.parseInt(opt("chunk", "16384"));
        long pace = Long.parseLong(opt("pace-ms", "0"));
        SSLSocket sock = (SSLSocket) ctx.getSocketFactory().createSocket();
        sock.connect(new InetSocketAddress(loopback(), Integer.parseInt(opt("port", "0"))),
                     Integer.parseInt(opt("timeout", "30")) * 1000);
        sock.setEnabledProtocols(protocols());
        javax.net.ssl.SSLParameters params = sock.getSSLParameters();
        params.setServerNames(List.of(new javax.net.ssl.SNIHostName(opt("server-name", "localhost"))));
        params.setEndpointIdentificationAlgorithm("HTTPS");
        sock.setSSLParameters(params);
        watch(sock);
        sock.startHandshake();
        startRekeys(sock);
        MessageDigest sent = MessageDigest.getInstance("SHA-256");
        MessageDigest received = MessageDigest.getInstance("SHA-256");
        InputStream in = sock.getInputStream();
        byte[] buf = new byte[65536];
        long count = 0;
        if (Boolean.parseBoolean(opt("lockstep", "false"))) {
            // One thread: write a chunk, read all of its echo, then pause.
            // JSSE cannot write from one thread while another runs a
            // renegotiation (docs/security.rst), so a TLS 1.2 client that
            // writes only after a pause gives the server's quiet-period
            // rule a window that does not depend on thread timing.
            OutputStream out = sock.getOutputStream();
            SecureRandom random = new SecureRandom();
            byte[] chunkBuf = new byte[chunk];
            for (int left = total; left > 0; left -= chunk) {
                int len = Math.min(left, chunk);
                random.nextBytes(chunkBuf);
                sent.update(chunkBuf, 0, len);
                out.write(chunkBuf, 0, len);
                out.flush();
                count = readEcho(in, buf, received, count, total - left + len);
                if (pace > 0 && left > len) {
                    Thread.sleep(pace);
                }
            }
            finish(sock, in, buf, sent, received, count);
            return;
        }
        AtomicReference<Throwable> writeError = new AtomicReference<>();
        Thread writer = new Thread(() -> {
            try {
                OutputStream out = sock.getOutputStream();
                SecureRandom random = new SecureRandom();
                byte[] chunkBuf = new byte[chunk];
                for (int left = total; left > 0; left -= chunk) {
                    int len = Math.min(left, chunk);
                    random.nextBytes(chunkBuf);
                    sent.update(chunkBuf, 0, len);
                    out.write(chunkBuf, 0, len);
                    out.flush();
                    if (pace > 0) {
                        Thread.sleep(pace);
                    }
                }
            } catch (Throwable e) {
                writeError.set(e);
            }
        });
        writer.start();
        count = readEcho(in, buf, received, count, total);
        writer.join();
        if (writeError.get() != null) {
            throw new Exception("write failed", writeError.get());
        }
        finish(sock, in, buf, sent, received, count);
    }

    // Reads the echo until *until* bytes have come back in all.
    private static long readEcho(InputStream in, byte[] buf, MessageDigest received,
                                 long count, long until) throws java.io.IOException {
        while (count < until) {
            int got = in.read(buf, 0, (int) Math.min(buf.length, until - count));
            if (got < 0) {
                throw new java.io.EOFException("closed after " + count + " of " + until + " bytes");
            }
            received.update(buf, 0, got);
            count += got;
        }
        return count;
    }

    private static void finish(SSLSocket sock, InputStream in, byte[] buf, MessageDigest sent,
                               MessageDigest received, long count) throws Exception {
        String a = HexFormat.of().formatHex(sent.digest());
        String b = HexFormat.of().formatHex(received.digest());
        say("RESULT bytes=" + count + " sha256=" + b + " match=" + a.equals(b));
        // close() alone sends user_canceled on TLS 1.3, which Go takes for
        // an error: a close_notify first, then wait for the peer's.
        sock.shutdownOutput();
        try {
            while (in.read(buf) >= 0) {
                // the peer has nothing more to send
            }
        } catch (java.io.IOException e) {
            // After our close_notify: JSSE fails a renegotiation the server
            // had started before it read ours; the data was checked above.
            say("CLOSING " + e);
        }
        sock.close();
        if (!a.equals(b)) {
            throw new Exception("the echo differs from what was sent");
        }
    }

    public static void main(String[] args) {
        try {
            for (int i = 0; i < args.length; i++) {
                if (!args[i].startsWith("--") || i + 1 >= args.length) {
                    throw new IllegalArgumentException("options are --name value pairs: " + args[i]);
                }
                opts.put(args[i].substring(2), args[++i]);
            }
            long timeout = Long.parseLong(opt("timeout", "30"));
            Thread watchdog = new Thread(() -> {
                try {
                    Thread.sleep(timeout * 1000);
                    fail(new Exception("still running after " + timeout + " s"));
                } catch (InterruptedException e) {
                    // exiting
                }
            });
            watchdog.setDaemon(true);
            watchdog.start();
            SSLContext ctx = context();
            switch (opt("role", "client")) {
                case "server" -> serve(ctx);
                case "client" -> client(ctx);
                default -> throw new IllegalArgumentException("--role must be server or client");
            }
            System.exit(0);
        } catch (Throwable e) {
            fail(e);
        }
    }
}
