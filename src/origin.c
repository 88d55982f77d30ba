/*-------------------------------------------------------------------------
 *
 * origin.c
 *		The server a call-log row comes from (issue 11): its system
 *		identifier and its node name, and the node file
 *		pg_fw_tier/node that tells a server from a copy of it.
 *
 * Every row of fw_tier.calls carries (origin_sysid, origin_node): the
 * system identifier of the server that made the call
 * (pg_control_system().system_identifier) and that server's node name.
 * A streaming standby shares its primary's system identifier, so the node
 * name is what tells them apart; the primary key is (origin_sysid,
 * origin_node, call_id, attempt), unique across a fleet.
 *
 * The node name, fixed for the life of the postmaster:
 *	- fw_tier.node_name when set (PGC_POSTMASTER), an explicit override;
 *	- else the generated id kept in pg_fw_tier/node.
 * Not cluster_name: packagers set it alike on every server (Debian's
 * pg_createcluster writes '15/main'), so a primary and its standbys, or
 * two standbys, would share a name.  Names must be unique among the
 * servers that log into one table: a standby named like its primary would
 * write rows the primary's key already has, so shipping under the
 * primary's own identity is refused, and the primary remembers which node
 * id first shipped under a name (fw_tier.origin_nodes) and refuses
 * another (fw_tier.ingest_calls, shipper.c).
 *
 * The node file.  pg_basebackup (or any file copy of the data directory)
 * copies pg_fw_tier/ to the new server: its generated id, and the ring,
 * intents and spill of the call log.  So the file records where it was
 * written: the system identifier, the data directory's path and inode
 * and the host name.  The postmaster checks them at its first start
 * (fw_origin_startup, before the call log is mapped):
 *	- the system identifier differs: a copy (initdb'd elsewhere, the
 *	  file carried over).  It gets a new id, and the ring, the intents
 *	  and the spill found beside it are removed before they are mapped:
 *	  their records belong to the server they were copied from, which
 *	  writes them itself.  (Written again from here they would be
 *	  duplicates at best; an intent's 'unknown' record could even win
 *	  over the real record that its own server logs later.)
 *	- the path, the inode or the host name differ: the same server
 *	  moved, restored in place or renamed (host names change without a
 *	  copy: containers, DHCP).  The id and the call log are kept, with a
 *	  LOG, and the file is rewritten.  Deleting the log would lose paid
 *	  records; a copy that is not a base backup (cp or rsync of a stopped
 *	  server) is therefore not told apart: make copies with
 *	  pg_basebackup, or delete pg_fw_tier/ in the copy;
 *	- a backup_label file (the first start of a base backup: the startup
 *	  process renames it as soon as it reads it, after this hook): a copy,
 *	  whatever the node file says (a base backup of a server that ran
 *	  fw_tier 0.3 has none);
 *	- no file (and no backup_label): a new server, or one that ran fw_tier
 *	  0.3 or older, a standby included.  It gets an id; its call log is
 *	  kept.
 *	- a damaged file: a new id, the call log kept (the damage says
 *	  nothing about whose records they are), with a LOG.
 * The file is written as a whole and renamed into place (durable_rename).
 * Its contents are untrusted (bounded read, every field checked).
 *
 * Locking: none.  The postmaster fills the statics before any child
 * exists; children inherit them through fork() and only read them.
 *
 * Called by: shmem.c (fw_origin_startup, from the shmem startup hook),
 * fw_tier.c (fw_origin_define_gucs), loginsert.c (fw_origin_node_name,
 * fw_origin_sysid for the rows of this server), shipper.c, and SQL
 * (fw_tier.local_origin()).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/htup_details.h"
#include "access/xlog.h"
#include "common/file_perm.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/pg_crc32c.h"
#include "postmaster/postmaster.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "fw_tier.h"

#define FW_ORIGIN_DIR		"pg_fw_tier"
#define FW_NODE_FILE		"pg_fw_tier/node"
#define FW_NODE_TMP			"pg_fw_tier/node.tmp"
#define FW_NODE_FILE_MAX	4096	/* the file is read up to this */

char	   *fw_node_name_guc = NULL;

/* postmaster-filled, inherited by children */
static char fw_node[FW_NODELEN];
static char fw_node_id[FW_NODELEN];	/* the node file's id */
static bool fw_node_known = false;

/* what the node file says (or should say) */
typedef struct FwNodeFile
{
	char		id[FW_NODELEN];
	uint64		sysid;
	char		datadir[MAXPGPATH];
	char		host[256];
	uint64		inode;
} FwNodeFile;

/* a name is printable ASCII, 1 to FW_NODELEN - 1 bytes */
bool
fw_origin_name_ok(const char *s)
{
	size_t		len = strnlen(s, FW_NODELEN);

	if (len == 0 || len >= FW_NODELEN)
		return false;
	for (size_t i = 0; i < len; i++)
		if (s[i] < 32 || s[i] > 126)
			return false;
	return true;
}

static bool
fw_node_name_check(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (!fw_origin_name_ok(*newval))
	{
		GUC_check_errdetail("A node name is 1 to %d bytes of printable ASCII.",
							FW_NODELEN - 1);
		return false;
	}
	return true;
}

void
fw_origin_define_gucs(void)
{
	DefineCustomStringVariable("fw_tier.node_name",
							   "Name of this server in the origin_node column of fw_tier.calls.",
							   "Empty: an id generated once and kept in pg_fw_tier/node.",
							   &fw_node_name_guc, "",
							   PGC_POSTMASTER, 0,
							   fw_node_name_check, NULL, NULL);
}

/* this server as the node file should describe it */
static void
fw_node_here(FwNodeFile *nf)
{
	struct stat st;

	memset(nf, 0, sizeof(*nf));
	nf->sysid = GetSystemIdentifier();
	strlcpy(nf->datadir, DataDir ? DataDir : "", sizeof(nf->datadir));
	if (gethostname(nf->host, sizeof(nf->host) - 1) != 0)
		strlcpy(nf->host, "?", sizeof(nf->host));
	nf->host[sizeof(nf->host) - 1] = '\0';
	/* no newline may break the file's lines */
	for (char *p = nf->host; *p; p++)
		if (*p < 32 || *p > 126)
			*p = '?';
	for (char *p = nf->datadir; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = '?';
	if (stat(".", &st) == 0)
		nf->inode = (uint64) st.st_ino;
}

/* parse the file's text; false when a field is missing or malformed */
static bool
fw_node_parse(char *text, FwNodeFile *nf)
{
	bool		have_id = false,
				have_sysid = false,
				have_dir = false,
				have_host = false,
				have_inode = false;
	char	   *line = text;

	memset(nf, 0, sizeof(*nf));
	while (line && *line)
	{
		char	   *next = strchr(line, '\n');
		char	   *eq;
		char	   *end;

		if (next)
			*next++ = '\0';
		eq = strchr(line, '=');
		if (line[0] == '#' || eq == NULL)
		{
			line = next;
			continue;
		}
		*eq++ = '\0';
		if (strcmp(line, "node_id") == 0)
		{
			if (!fw_origin_name_ok(eq))
				return false;
			strlcpy(nf->id, eq, sizeof(nf->id));
			have_id = true;
		}
		else if (strcmp(line, "system_identifier") == 0)
		{
			errno = 0;
			nf->sysid = strtou64(eq, &end, 10);
			if (errno != 0 || *end != '\0' || end == eq)
				return false;
			have_sysid = true;
		}
		else if (strcmp(line, "data_directory") == 0)
		{
			if (strlen(eq) >= sizeof(nf->datadir))
				return false;
			strlcpy(nf->datadir, eq, sizeof(nf->datadir));
			have_dir = true;
		}
		else if (strcmp(line, "host") == 0)
		{
			if (strlen(eq) >= sizeof(nf->host))
				return false;
			strlcpy(nf->host, eq, sizeof(nf->host));
			have_host = true;
		}
		else if (strcmp(line, "inode") == 0)
		{
			errno = 0;
			nf->inode = strtou64(eq, &end, 10);
			if (errno != 0 || *end != '\0' || end == eq)
				return false;
			have_inode = true;
		}
		line = next;
	}
	return have_id && have_sysid && have_dir && have_host && have_inode;
}

/* 1 = read and parsed, 0 = no file, -1 = damaged */
static int
fw_node_read(FwNodeFile *nf)
{
	char		buf[FW_NODE_FILE_MAX + 1];
	int			fd;
	ssize_t		n;
	struct stat st;

	/* not through a symlink, and no wait on a FIFO: a regular file only */
	fd = BasicOpenFile(FW_NODE_FILE, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | PG_BINARY);
	if (fd < 0)
	{
		if (errno == ENOENT)
			return 0;
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", FW_NODE_FILE)));
		return -1;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		close(fd);
		ereport(LOG,
				(errmsg("fw_tier: \"%s\" is not a regular file", FW_NODE_FILE)));
		return -1;
	}
	n = read(fd, buf, FW_NODE_FILE_MAX + 1);
	close(fd);
	if (n < 0 || n > FW_NODE_FILE_MAX)
		return -1;
	buf[n] = '\0';
	if (strlen(buf) != (size_t) n)
		return -1;				/* a NUL inside */
	return fw_node_parse(buf, nf) ? 1 : -1;
}

static void
fw_node_write(const FwNodeFile *nf)
{
	char	   *text;
	int			fd;
	size_t		len;

	text = psprintf("# fw_tier node identity: written by the postmaster, see README \"Read replicas\"\n"
					"node_id=%s\nsystem_identifier=" UINT64_FORMAT "\n"
					"data_directory=%s\nhost=%s\ninode=" UINT64_FORMAT "\n",
					nf->id, nf->sysid, nf->datadir, nf->host, nf->inode);
	len = strlen(text);
	fd = BasicOpenFilePerm(FW_NODE_TMP, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY,
						   pg_file_create_mode);
	if (fd < 0 || write(fd, text, len) != (ssize_t) len || pg_fsync(fd) != 0)
	{
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not write file \"%s\": %m", FW_NODE_TMP)));
		if (fd >= 0)
			close(fd);
		pfree(text);
		return;
	}
	close(fd);
	pfree(text);
	(void) durable_rename(FW_NODE_TMP, FW_NODE_FILE, LOG);
}

/*
 * Remove the call log's files (calllog.c: calllog.ring, calllog.intents;
 * spill.c: spill.*) before they are mapped: they came with a copy.
 */
static int
fw_origin_discard_log(void)
{
	DIR		   *dir;
	struct dirent *de;
	int			removed = 0;

	dir = AllocateDir(FW_ORIGIN_DIR);
	while ((de = ReadDirExtended(dir, FW_ORIGIN_DIR, LOG)) != NULL)
	{
		char		path[MAXPGPATH];

		if (strncmp(de->d_name, "calllog.", 8) != 0 &&
			strncmp(de->d_name, "spill.", 6) != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", FW_ORIGIN_DIR, de->d_name);
		if (unlink(path) == 0)
			removed++;
		else
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("could not remove file \"%s\": %m", path)));
	}
	FreeDir(dir);
	return removed;
}

static void
fw_node_generate(char *id)
{
	uint8		bytes[6];

	if (!pg_strong_random(bytes, sizeof(bytes)))
	{
		uint64		t = (uint64) GetCurrentTimestamp() ^ ((uint64) MyProcPid << 32);

		memcpy(bytes, &t, sizeof(bytes));
	}
	snprintf(id, FW_NODELEN, "node-%02x%02x%02x%02x%02x%02x",
			 bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]);
}

/*
 * Postmaster, shmem startup hook, before the call log is mapped: settle
 * the node name and whether the call log's files came with a copy (the
 * header comment).  Once per postmaster: a crash-restart keeps both.
 */
void
fw_origin_startup(void)
{
	FwNodeFile here;
	FwNodeFile found;
	int			st;
	bool		copy = false;
	const char *why = NULL;
	struct stat sst;

	if (IsUnderPostmaster || fw_node_known)
		return;

	if (MakePGDirectory(FW_ORIGIN_DIR) < 0 && errno != EEXIST)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create directory \"%s\": %m", FW_ORIGIN_DIR)));

	fw_node_here(&here);
	st = fw_node_read(&found);
	if (stat(BACKUP_LABEL_FILE, &sst) == 0)
	{
		copy = true;
		why = "The data directory starts from a base backup (backup_label)";
	}
	else if (st == 1)
	{
		const char *moved = NULL;

		if (found.sysid != here.sysid)
			why = "The node file was written by a server of another system identifier";
		copy = (why != NULL);

		/*
		 * Host names change without a copy (containers, DHCP), and so do a
		 * data directory's path and inode (a move, a restore of the same
		 * server): not a copy.  The id and the call log are kept; the file
		 * is rewritten so this is said once.
		 */
		if (!copy && strcmp(found.datadir, here.datadir) != 0)
			moved = "its data directory path";
		else if (!copy && strcmp(found.host, here.host) != 0)
			moved = "its host name";
		else if (!copy && found.inode != here.inode)
			moved = "its data directory's inode";
		if (moved)
		{
			ereport(LOG,
					(errmsg("fw_tier: %s changed since the node file was written; node id \"%s\" and the call log are kept",
							moved, found.id),
					 errdetail("Only a base backup (backup_label at the first start) or another system identifier counts as a copy.")));
			strlcpy(here.id, found.id, sizeof(here.id));
			fw_node_write(&here);
		}
	}
	else if (st == -1)
		ereport(LOG,
				(errmsg("fw_tier: the node file \"%s\" is damaged; this server gets a new node id",
						FW_NODE_FILE)));

	if (copy)
	{
		int			removed = fw_origin_discard_log();

		ereport(LOG,
				(errmsg("fw_tier: this data directory is a copy of another server's; it gets a new node id and the %d call-log files copied with it are removed",
						removed),
				 errdetail("%s.  The records in the copied ring, intents and spill belong to the server they were copied from, which logs them itself.",
						   why)));
	}
	if (st == 1 && !copy)
		strlcpy(here.id, found.id, sizeof(here.id));
	else
	{
		fw_node_generate(here.id);
		fw_node_write(&here);
	}

	strlcpy(fw_node_id, here.id, sizeof(fw_node_id));
	if (fw_node_name_guc && fw_node_name_guc[0])
		strlcpy(fw_node, fw_node_name_guc, sizeof(fw_node));
	else
		strlcpy(fw_node, here.id, sizeof(fw_node));
	fw_node_known = true;
}

/*
 * This server's node name.  Outside a preloaded server (an ALTER
 * EXTENSION UPDATE in a server without fw_tier preloaded) the same rule
 * is followed without writing anything: the setting, the node file's id,
 * else the empty string.
 */
const char *
fw_origin_node_name(void)
{
	if (!fw_node_known)
	{
		const char *guc = GetConfigOption("fw_tier.node_name", true, false);
		FwNodeFile nf;

		fw_node_id[0] = '\0';
		if (fw_node_read(&nf) == 1)
			strlcpy(fw_node_id, nf.id, sizeof(fw_node_id));
		if (guc && fw_origin_name_ok(guc))
			strlcpy(fw_node, guc, sizeof(fw_node));
		else
			strlcpy(fw_node, fw_node_id, sizeof(fw_node));
		fw_node_known = true;
	}
	return fw_node;
}

/* the node file's id (= the node name unless fw_tier.node_name is set) */
const char *
fw_origin_node_id(void)
{
	(void) fw_origin_node_name();
	return fw_node_id;
}

/* pg_control_system().system_identifier, as the bigint SQL shows */
int64
fw_origin_sysid(void)
{
	return (int64) GetSystemIdentifier();
}

/* SQL: fw_tier.local_origin(OUT origin_sysid bigint, OUT origin_node text) */
PG_FUNCTION_INFO_V1(fw_tier_local_origin);
Datum
fw_tier_local_origin(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = Int64GetDatum(fw_origin_sysid());
	values[1] = CStringGetTextDatum(fw_origin_node_name());
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc),
													  values, nulls)));
}
