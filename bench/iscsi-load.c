/*
 * iscsi-load: a libiscsi load generator for bench/iscsi-vs-tgt.sh, for what
 * iscsi-perf (libiscsi 1.19) cannot do: writes, and a fixed number of commands (so
 * that callgrind instruction counts divide by an exact command count).
 *
 *   iscsi-load [-i INITIATOR] [-m QD] [-b BLOCKS] [-t SECONDS | -n COUNT] [-r] [-w]
 *              iscsi://HOST:PORT/IQN/LUN
 *
 * -w writes (WRITE16 of a constant buffer) instead of READ16; -r random LBAs aligned
 * to the transfer size; otherwise sequential, wrapping at the end of the LUN. Prints
 * the same last line as iscsi-perf: "iops average N (X MB/s)", then "commands N".
 * Login parameters are libiscsi's defaults (as iscsi-perf's), header digest
 * None preferred. Build: cc -O2 -o iscsi-load bench/iscsi-load.c -liscsi
 */
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

struct client {
	struct iscsi_context *iscsi;
	int lun, blocksize, write, random, qd, blocks;
	uint64_t num_blocks, pos, issued, done, limit;
	uint64_t start_ns, stop_ns;
	unsigned char *buf;
	int stopping;
};

static uint64_t now_ns(void)
{
	struct timespec tp;
	clock_gettime(CLOCK_MONOTONIC, &tp);
	return (uint64_t)tp.tv_sec * 1000000000ull + (uint64_t)tp.tv_nsec;
}

static void fill(struct client *c);

static void cb(struct iscsi_context *iscsi, int status, void *command_data, void *private_data)
{
	struct client *c = private_data;
	struct scsi_task *task = command_data;
	if (status != SCSI_STATUS_GOOD) {
		fprintf(stderr, "command failed: status %d sense key %d ascq %04x: %s\n", status,
			task->sense.key, task->sense.ascq, iscsi_get_error(iscsi));
		exit(10);
	}
	scsi_free_scsi_task(task);
	c->done++;
	fill(c);
}

static void fill(struct client *c)
{
	while (!c->stopping && c->issued - c->done < (uint64_t)c->qd) {
		if (c->limit && c->issued >= c->limit) {
			c->stopping = 1;
			break;
		}
		if (c->stop_ns && (c->issued & 63) == 0 && now_ns() >= c->stop_ns) {
			c->stopping = 1;
			break;
		}
		uint64_t slots = c->num_blocks / (uint64_t)c->blocks;
		uint64_t lba;
		if (c->random) {
			lba = ((uint64_t)rand() % slots) * (uint64_t)c->blocks;
		} else {
			if (c->pos + (uint64_t)c->blocks > c->num_blocks)
				c->pos = 0;
			lba = c->pos;
			c->pos += (uint64_t)c->blocks;
		}
		uint32_t len = (uint32_t)(c->blocks * c->blocksize);
		struct scsi_task *t;
		if (c->write)
			t = iscsi_write16_task(c->iscsi, c->lun, lba, c->buf, len, c->blocksize, 0, 0,
					       0, 0, 0, cb, c);
		else
			t = iscsi_read16_task(c->iscsi, c->lun, lba, len, c->blocksize, 0, 0, 0, 0, 0,
					      cb, c);
		if (t == NULL) {
			fprintf(stderr, "cannot queue a command: %s\n", iscsi_get_error(c->iscsi));
			exit(10);
		}
		c->issued++;
	}
}

int main(int argc, char **argv)
{
	const char *initiator = "iqn.2026-11.test:bench";
	struct client c;
	int opt;
	uint64_t secs = 10;
	memset(&c, 0, sizeof(c));
	c.qd = 32;
	c.blocks = 8;
	while ((opt = getopt(argc, argv, "i:m:b:t:n:rw")) != -1) {
		switch (opt) {
		case 'i': initiator = optarg; break;
		case 'm': c.qd = atoi(optarg); break;
		case 'b': c.blocks = atoi(optarg); break;
		case 't': secs = strtoull(optarg, NULL, 10); break;
		case 'n': c.limit = strtoull(optarg, NULL, 10); break;
		case 'r': c.random = 1; break;
		case 'w': c.write = 1; break;
		default:
			fprintf(stderr, "usage: iscsi-load [-i INITIATOR] [-m QD] [-b BLOCKS] "
					"[-t SECONDS | -n COUNT] [-r] [-w] URL\n");
			return 1;
		}
	}
	if (optind != argc - 1 || c.qd < 1 || c.blocks < 1) {
		fprintf(stderr, "usage: iscsi-load [options] iscsi://HOST:PORT/IQN/LUN\n");
		return 1;
	}
	c.iscsi = iscsi_create_context(initiator);
	struct iscsi_url *url = iscsi_parse_full_url(c.iscsi, argv[optind]);
	if (url == NULL) {
		fprintf(stderr, "bad URL: %s\n", iscsi_get_error(c.iscsi));
		return 10;
	}
	iscsi_set_targetname(c.iscsi, url->target);
	iscsi_set_session_type(c.iscsi, ISCSI_SESSION_NORMAL);
	iscsi_set_header_digest(c.iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
	if (url->user[0] != 0 &&
	    iscsi_set_initiator_username_pwd(c.iscsi, url->user, url->passwd) != 0) {
		fprintf(stderr, "CHAP setup failed\n");
		return 10;
	}
	if (iscsi_full_connect_sync(c.iscsi, url->portal, url->lun) != 0) {
		fprintf(stderr, "login failed: %s\n", iscsi_get_error(c.iscsi));
		return 10;
	}
	c.lun = url->lun;
	iscsi_destroy_url(url);
	struct scsi_task *task = iscsi_readcapacity16_sync(c.iscsi, c.lun);
	struct scsi_readcapacity16 *rc16 = task ? scsi_datain_unmarshall(task) : NULL;
	if (rc16 == NULL) {
		fprintf(stderr, "READ CAPACITY(16) failed\n");
		return 10;
	}
	c.blocksize = (int)rc16->block_length;
	c.num_blocks = rc16->returned_lba + 1;
	scsi_free_scsi_task(task);
	if (c.num_blocks < (uint64_t)c.blocks) {
		fprintf(stderr, "LUN smaller than one transfer\n");
		return 10;
	}
	c.buf = malloc((size_t)c.blocks * (size_t)c.blocksize);
	memset(c.buf, 0xa5, (size_t)c.blocks * (size_t)c.blocksize);
	srand((unsigned)now_ns());
	c.start_ns = now_ns();
	if (!c.limit)
		c.stop_ns = c.start_ns + secs * 1000000000ull;
	fill(&c);
	while (c.issued > c.done) {
		struct pollfd pfd = { iscsi_get_fd(c.iscsi), (short)iscsi_which_events(c.iscsi), 0 };
		if (poll(&pfd, 1, -1) < 0)
			continue;
		if (iscsi_service(c.iscsi, pfd.revents) < 0) {
			fprintf(stderr, "iscsi_service: %s\n", iscsi_get_error(c.iscsi));
			return 10;
		}
	}
	uint64_t ns = now_ns() - c.start_ns;
	uint64_t iops = ns ? c.done * 1000000000ull / ns : 0;
	uint64_t mbps = (iops * (uint64_t)c.blocks * (uint64_t)c.blocksize) >> 20;
	printf("iops average %" PRIu64 " (%" PRIu64 " MB/s)\ncommands %" PRIu64 "\n", iops, mbps,
	       c.done);
	iscsi_logout_sync(c.iscsi);
	iscsi_destroy_context(c.iscsi);
	return 0;
}
