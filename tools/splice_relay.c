/*
 * The least a relay can do: a reference for tools/bench.py, not a proxy to use.
 *
 * It speaks just enough SOCKS5 for the benchmark (no authentication, CONNECT
 * to an IPv4 address), then moves the bytes of each direction in a thread of
 * its own with blocking splice() calls through a pipe: no poll loop, no copy
 * through the process, no checks. Whatever the machine gives a relay, this
 * gets; dispatch is measured against it.
 *
 * Build and run (Linux): cc -O2 -pthread -o splice_relay splice_relay.c
 *                        ./splice_relay 127.0.0.1 PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_SIZE (1 << 20)

struct direction {
    int from;
    int to;
};

/* Receive exactly len bytes; 0 on success. */
static int recv_exact(int fd, unsigned char *buf, size_t len)
{
    return recv(fd, buf, len, MSG_WAITALL) == (ssize_t)len ? 0 : -1;
}

/* Move bytes from one socket to the other until EOF, then half-close.
 * Without a pipe the connection is cut, so that the benchmark sees it fail. */
static void *pump(void *arg)
{
    struct direction *d = arg;
    int pipe_ends[2];

    if (pipe(pipe_ends) != 0) {
        perror("splice_relay: pipe");
        shutdown(d->from, SHUT_RDWR);
    } else {
        /* Past the per-user pipe quota (fs.pipe-user-pages-soft; root is
         * exempt) pipes keep their default size, and bulk goes slower. */
        if (fcntl(pipe_ends[1], F_SETPIPE_SZ, PIPE_SIZE) < 0)
            perror("splice_relay: F_SETPIPE_SZ (bulk figures will be low)");
        for (;;) {
            ssize_t in_pipe = splice(d->from, NULL, pipe_ends[1], NULL, PIPE_SIZE, SPLICE_F_MOVE);
            if (in_pipe <= 0)
                break;
            while (in_pipe > 0) {
                ssize_t sent = splice(pipe_ends[0], NULL, d->to, NULL, in_pipe, SPLICE_F_MOVE);
                if (sent <= 0)
                    goto done;
                in_pipe -= sent;
            }
        }
done:
        close(pipe_ends[0]);
        close(pipe_ends[1]);
    }
    shutdown(d->to, SHUT_WR);
    return NULL;
}

/* One client: the SOCKS5 handshake, the upstream connect, then both directions. */
static void *serve(void *arg)
{
    int client = (int)(long)arg;
    int upstream = -1;
    unsigned char greeting[3], request[10];
    static const unsigned char no_auth[2] = {5, 0};
    static const unsigned char granted[10] = {5, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    struct sockaddr_in target = {.sin_family = AF_INET};

    if (recv_exact(client, greeting, sizeof greeting) || greeting[0] != 5 || greeting[1] != 1
        || greeting[2] != 0 || send(client, no_auth, sizeof no_auth, 0) != sizeof no_auth
        || recv_exact(client, request, sizeof request) || request[1] != 1 || request[3] != 1)
        goto end;
    memcpy(&target.sin_addr, request + 4, 4);
    memcpy(&target.sin_port, request + 8, 2);
    upstream = socket(AF_INET, SOCK_STREAM, 0);
    if (upstream < 0 || connect(upstream, (struct sockaddr *)&target, sizeof target) != 0
        || send(client, granted, sizeof granted, 0) != sizeof granted)
        goto end;

    struct direction up = {client, upstream}, down = {upstream, client};
    pthread_t up_thread;
    if (pthread_create(&up_thread, NULL, pump, &up) != 0)
        goto end;
    pump(&down);
    pthread_join(up_thread, NULL);
end:
    if (upstream >= 0)
        close(upstream);
    close(client);
    return NULL;
}

int main(int argc, char **argv)
{
    struct sockaddr_in address = {.sin_family = AF_INET};
    int one = 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    char *end;
    long port = argc == 3 ? strtol(argv[2], &end, 10) : -1;

    if (argc != 3 || inet_pton(AF_INET, argv[1], &address.sin_addr) != 1 || *end || port < 0 || port > 65535) {
        fprintf(stderr, "usage: %s IPV4 PORT\n", argv[0]);
        return 2;
    }
    /* A client that resets must end its own connection, not the process. */
    signal(SIGPIPE, SIG_IGN);
    address.sin_port = htons((unsigned short)port);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 4096) != 0) {
        perror("splice_relay: listen");
        return 1;
    }
    for (;;) {
        int client = accept(listener, NULL, NULL);
        pthread_t thread;
        if (client < 0) {
            usleep(10000); /* out of descriptors: wait for some to close */
            continue;
        }
        if (pthread_create(&thread, NULL, serve, (void *)(long)client) != 0)
            close(client);
        else
            pthread_detach(thread);
    }
}
